"""liftq: LiftQuant compression of LLMs to any fractional bit-width."""

__version__ = "0.1.0"
