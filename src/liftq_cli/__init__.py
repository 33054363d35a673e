"""liftq: LiftQuant compression of LLMs to any fractional bit-width."""

# Lets transformers load packed LiftQuant folders; imports nothing heavy (see runtime/hook.py).
from liftq_cli.runtime.hook import install as _install_hf_hook
from liftq_cli.version import __version__ as __version__

_install_hf_hook()
