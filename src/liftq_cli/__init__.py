"""liftq: LiftQuant compression of LLMs to any fractional bit-width."""

__version__ = "0.1.0"

# Lets transformers load packed LiftQuant folders; imports nothing heavy (see runtime/hook.py).
from liftq_cli.runtime.hook import install as _install_hf_hook  # noqa: E402

_install_hf_hook()
