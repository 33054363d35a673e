"""`runtime.hook.install`: liftquant is registered with transformers, lazily and exactly once.

Each test runs a fresh interpreter: the hook's behaviour depends on what is already imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", textwrap.dedent(script)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_registers_when_the_registry_first_loads_and_only_once():
    out = _run(
        """
        import sys
        import liftq_cli
        from liftq_cli.runtime.hook import TARGET, _Finder, install

        def finders():
            return sum(isinstance(f, _Finder) for f in sys.meta_path)

        assert TARGET not in sys.modules, "import liftq_cli must not load the registry"
        install()
        install()
        print(finders())  # one pending hook, however often install() runs
        import transformers.quantizers.auto as auto
        from liftq_cli.runtime.hf import LiftQuantConfig, LiftQuantHfQuantizer

        print(auto.AUTO_QUANTIZER_MAPPING.get("liftquant") is LiftQuantHfQuantizer)
        print(auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get("liftquant") is LiftQuantConfig)
        print(finders())  # the hook removed itself
        install()  # registry loaded: registers at once (a no-op now), adds no hook
        print(finders())
        """
    )
    assert out == ["1", "True", "True", "0", "0"]


def test_registers_at_once_when_the_registry_is_already_loaded():
    out = _run(
        """
        import sys
        import transformers.quantizers.auto as auto

        print("liftquant" in auto.AUTO_QUANTIZER_MAPPING)  # transformers alone does not know it
        import liftq_cli
        from liftq_cli.runtime.hf import LiftQuantHfQuantizer
        from liftq_cli.runtime.hook import _Finder

        print(auto.AUTO_QUANTIZER_MAPPING.get("liftquant") is LiftQuantHfQuantizer)
        print(sum(isinstance(f, _Finder) for f in sys.meta_path))
        """
    )
    assert out == ["False", "True", "0"]
