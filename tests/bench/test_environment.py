"""bench/environment.py: the versions line every bench results file records."""

from __future__ import annotations

import importlib.metadata
import platform

import torch
import transformers
from bench.environment import PACKAGES, versions, versions_line


def test_versions_are_the_installed_ones():
    found = versions()
    assert list(found) == [*PACKAGES, "python"]
    assert found["torch"] == torch.__version__
    assert found["transformers"] == transformers.__version__
    assert found["liftq"] == importlib.metadata.version("liftq")
    assert found["python"] == platform.python_version()


def test_a_missing_package_is_named_not_raised():
    assert versions(("liftq", "no-such-package-liftq"))["no-such-package-liftq"] == "not installed"


def test_one_line_naming_each_package_and_its_version():
    line = versions_line()
    assert "\n" not in line and line.startswith("versions: liftq ")
    assert f"torch {torch.__version__}, transformers {transformers.__version__}" in line
