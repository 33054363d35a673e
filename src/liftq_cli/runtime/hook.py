"""Register the `liftquant` method with transformers as soon as transformers can use it.

`import liftq_cli` calls `install()`. Importing transformers' quantizer registry costs seconds,
so liftq does not import it eagerly: if `transformers.quantizers.auto` is already imported the
method is registered at once, otherwise a one-shot import hook registers it right after that
module first executes (which `from_pretrained` always triggers). After that,
`AutoModelForCausalLM.from_pretrained(packed_dir)` builds `LiftQuantLinear` layers. Calling
`liftq_cli.runtime.hf.register()` directly does the same.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    from liftq_cli.runtime.hf import register

    register()


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the real loader of TARGET: executes it, then registers liftquant."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    """Finds TARGET through the other finders and wraps its loader; removes itself once used."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it first loads."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
