"""The work directory of a quantize job: every path and file format in one place.

    job.json                  the job's settings and their fingerprint (a resume must match)
    block_0000.safetensors    one finished block: per linear `codes` (int32, 1 bit per code
                              bit, io/codes.py), `scale`, `s1`, `p1`, `p2`, `s2` (float32) and
                              `lattice` ([D, d]); the block report in the metadata
    streams.safetensors       the activations entering the next block: `fp` (full precision)
    streams.json              and `quant` (quantized so far; absent when it is `fp`) and the
                              index of that block
    sensitivity.json          the Fisher sensitivities of `--mixed`, under their fingerprint
    finetune.safetensors      the fine-tuned tensors and report, under their fingerprint

Every file is written atomically, so a job killed at any point resumes from its last finished
block. Work dirs of liftq 0.1 (codes stored as one bool byte per bit) still resume.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_file
from liftq_cli.io.codes import pack_codes, unpack_codes
from liftq_cli.lattice_config import LatticeConfig, LatticeConfigError

JOB_FILE = "job.json"
LOCK_FILE = ".lock"  # flock'ed while a job runs; holds its PID
STREAMS_FILE = "streams.safetensors"
STREAMS_STATE = "streams.json"
SENSITIVITY_FILE = "sensitivity.json"
FINETUNE_FILE = "finetune.safetensors"
LINEAR_STATE = ("codes", "scale", "s1", "p1", "p2", "s2")  # per linear, bool codes in memory

LinearState = dict[str, torch.Tensor]  # LINEAR_STATE -> tensor


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of a JSON-ready mapping (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(
            f"work-dir file '{path}' is unreadable ({exc}): delete the work dir to start over"
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(f"work-dir file '{path}' is not a JSON object: delete the work dir")
    return data


def _load(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A work-dir safetensors file; an unreadable one is a BadInputError naming it."""
    try:
        return load_file(path)
    except (OSError, SafetensorError) as exc:
        raise BadInputError(
            f"work-dir {what} '{path}' is unreadable ({exc}): delete the work dir to start over"
        ) from None


class WorkDir:
    """A job's resumable state on disk (see the module docstring for the layout)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- the job --------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the work dir for one job: a second job on it is refused, not interleaved."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                raise BadInputError(
                    f"--work-dir '{self.path}' is in use by another liftq quantize (PID "
                    f"{owner}): wait for it to finish or use another --work-dir"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def open_job(self, settings: dict[str, Any]) -> str:
        """Start a job with `settings`, or resume the one here; returns its fingerprint.

        A work dir holding a job with other settings is refused, naming the settings that
        changed."""
        key = fingerprint(settings)
        self.path.mkdir(parents=True, exist_ok=True)
        job_file = self.path / JOB_FILE
        if job_file.is_file():
            old = _read_json(job_file)
            if old.get("fingerprint") != key:
                before = old.get("settings") or {}
                diff = sorted(k for k in settings if before.get(k) != settings[k])
                raise BadInputError(
                    f"--work-dir '{self.path}' holds a job with different settings "
                    f"({', '.join(diff) or 'fingerprint'} changed): use another --work-dir or "
                    f"delete it to start over"
                )
        else:
            with atomic_file(job_file) as tmp:
                payload = {"fingerprint": key, "settings": settings}
                tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        return key

    def job_fingerprint(self) -> str:
        return str(_read_json(self.path / JOB_FILE)["fingerprint"])

    # -- finished blocks ------------------------------------------------------------------

    def block_file(self, layer: int) -> Path:
        return self.path / f"block_{layer:04d}.safetensors"

    def done(self) -> int:
        """Number of leading blocks whose results and following streams are complete."""
        state = self.path / STREAMS_STATE
        return int(_read_json(state)["next_layer"]) if state.is_file() else 0

    def save_block(
        self,
        layer: int,
        linears: dict[str, tuple[LatticeConfig, LinearState]],
        report: dict[str, Any],
    ) -> None:
        """Store block `layer`'s linears ({dotted name: (config, state)}, bool codes; on any
        device, stored from host memory)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, (cfg, state) in linears.items():
            tensors[f"{name}.codes"] = pack_codes(state["codes"].cpu())
            for part in LINEAR_STATE[1:]:
                tensors[f"{name}.{part}"] = state[part].cpu().contiguous()
            tensors[f"{name}.lattice"] = torch.tensor([cfg.D, cfg.d], device="cpu")
        with atomic_file(self.block_file(layer)) as tmp:
            save_file(tensors, str(tmp), metadata={"report": json.dumps(report)})

    def block_report(self, layer: int) -> dict[str, Any]:
        path = self.block_file(layer)
        try:
            with safe_open(path, framework="pt") as handle:
                return json.loads(handle.metadata()["report"])
        except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise BadInputError(
                f"work-dir block '{path}' is unreadable ({exc}): delete the work dir to start over"
            ) from None

    def load_block(self, layer: int) -> dict[str, tuple[LatticeConfig, LinearState]]:
        """Block `layer`'s linears: {dotted name: (config, state with bool codes)}."""
        path = self.block_file(layer)
        stored = _load(path, "block")
        result = {}
        for key in sorted(stored):
            if not key.endswith(".lattice"):
                continue
            name = key[: -len(".lattice")]
            try:
                cfg = LatticeConfig(*(int(v) for v in stored[key].tolist()))
                state = {part: stored[f"{name}.{part}"] for part in LINEAR_STATE}
            except (LatticeConfigError, KeyError, TypeError) as exc:
                raise BadInputError(
                    f"work-dir block '{path}' is inconsistent at {name} ({exc}): delete the "
                    f"work dir to start over"
                ) from None
            if state["codes"].dtype != torch.bool:  # packed words (liftq 0.1 stored bools)
                slices = -(-state["s1"].numel() // cfg.d)
                state["codes"] = unpack_codes(state["codes"], slices, cfg.D, f"{path}:{name}")
            result[name] = (cfg, state)
        return result

    # -- activation streams ---------------------------------------------------------------

    def save_streams(self, next_layer: int, fp: torch.Tensor, quant: torch.Tensor) -> None:
        """The activations entering block `next_layer` (`quant` may be `fp` itself)."""
        tensors = {"fp": fp.contiguous().cpu()}
        if quant is not fp:
            tensors["quant"] = quant.contiguous().cpu()
        with atomic_file(self.path / STREAMS_FILE) as tmp:
            save_file(tensors, str(tmp))
        with atomic_file(self.path / STREAMS_STATE) as tmp:
            tmp.write_text(json.dumps({"next_layer": next_layer}))

    def load_streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        streams = _load(self.path / STREAMS_FILE, "streams")
        return streams["fp"], streams.get("quant", streams["fp"])

    # -- cached stages --------------------------------------------------------------------

    def load_sensitivity(self, key: str) -> dict[tuple[int, str], float] | None:
        """Cached sensitivities {(layer, kind): kappa} if stored under fingerprint `key`."""
        path = self.path / SENSITIVITY_FILE
        if not path.is_file():
            return None
        saved = _read_json(path)
        if saved.get("fingerprint") != key:
            return None
        kappa = {}
        for name, value in saved["kappa"].items():  # "11.down_proj" -> (11, "down_proj")
            layer, _, kind = name.partition(".")
            kappa[(int(layer), kind)] = float(value)
        return kappa

    def save_sensitivity(
        self, key: str, kappa: dict[tuple[int, str], float], seconds: float
    ) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        payload = {
            "fingerprint": key,
            "seconds": round(seconds, 1),
            "kappa": {f"{layer}.{kind}": v for (layer, kind), v in sorted(kappa.items())},
        }
        with atomic_file(self.path / SENSITIVITY_FILE) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))

    def load_finetune(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Fine-tuned tensors and report if stored under fingerprint `key`."""
        path = self.path / FINETUNE_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("fingerprint") != key:
                return None
            return load_file(path), json.loads(meta["report"])
        except (OSError, SafetensorError, KeyError, json.JSONDecodeError):
            return None  # a damaged cache is recomputed (the stage is deterministic)

    def save_finetune(
        self, key: str, tensors: dict[str, torch.Tensor], report: dict[str, Any]
    ) -> None:
        with atomic_file(self.path / FINETUNE_FILE) as tmp:
            metadata = {"fingerprint": key, "report": json.dumps(report)}
            save_file(tensors, str(tmp), metadata=metadata)
