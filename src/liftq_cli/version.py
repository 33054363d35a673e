"""The package version (a leaf module: `from liftq_cli.version import __version__` pulls in
nothing else)."""

__version__ = "0.1.0"
