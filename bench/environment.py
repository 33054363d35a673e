"""The package versions a bench ran with, for every results file to record.

constraints.txt pins the set bench/results/ was measured with; each writer appends
`versions_line()` (and JSON writers store `versions()`), so a result that drifts from the pins
says so itself.
"""

from __future__ import annotations

import importlib.metadata
import platform

# liftq first, then what shapes the numbers: the math (torch, numpy, scipy), the model and
# tokenizer loading (transformers, tokenizers, safetensors, huggingface_hub, accelerate, gguf),
# the kernels (triton) and the calibration text (gensim).
PACKAGES = (
    "liftq",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "accelerate",
    "gguf",
    "numpy",
    "scipy",
    "triton",
    "gensim",
)


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{distribution: installed version, or "not installed"}, then "python": its version."""
    found = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def versions_line(packages: tuple[str, ...] = PACKAGES) -> str:
    """One line for a results file: "versions: liftq 0.1.0, torch 2.13.0+cpu, ..."."""
    return "versions: " + ", ".join(f"{k} {v}" for k, v in versions(packages).items())
