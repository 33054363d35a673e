"""The quality bench's evaluation: the fp32 model loaded once, each row's de-quantized weights
swapped in (safetensors, a fake-quantised HF folder or a GGUF), perplexity measured with
liftq's evaluator, and the result cached under bench/work/quality/eval-cache/, keyed by the
protocol (context, the token ids of each text) and the identity of the weights file.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from bench.quality_children import Inputs
from bench.quality_report import Row
from bench.quality_specs import CTX, LINEAR_WEIGHT, MODEL, WORK


class Evaluator:
    """The fp32 model loaded once; each row's weights are swapped in, measured, swapped out."""

    def __init__(self, inputs: Inputs) -> None:
        from liftq_cli.io.checkpoints import load_model

        self.inputs = inputs
        self.model = load_model(MODEL).model
        self.params = dict(self.model.state_dict())
        self.total_params = sum(p.numel() for p in self.model.parameters())  # tied once
        self.linear_weights = sum(
            t.numel() for k, t in self.params.items() if LINEAR_WEIGHT.match(k)
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Weight shapes (out, in) of the decoder linears every method quantizes."""
        return {k: tuple(t.shape) for k, t in self.params.items() if LINEAR_WEIGHT.match(k)}

    def overrides(self, out: Path) -> dict[str, torch.Tensor]:
        if (out / "model.gguf").is_file():
            return self._from_gguf(out / "model.gguf")
        from safetensors import safe_open

        if (out / "liftq.json").is_file() and not (out / "model.safetensors").is_file():
            # today's compact `liftq quantize` output: codes, reconstructed as liftq eval does
            from liftq_cli.runtime.quantized import dequantized_state

            state = dequantized_state(out)
            names = [k for k in state if LINEAR_WEIGHT.match(k)]
            assert len(names) == len(self.shapes()), f"{out} lacks decoder linears"
            return {k: state[k] for k in names}
        if (out / "liftq.json").is_file():  # an older fake-quantised HF folder: its linears
            with safe_open(out / "model.safetensors", framework="pt") as handle:
                names = [k for k in handle.keys() if LINEAR_WEIGHT.match(k)]  # noqa: SIM118 - not iterable
                assert len(names) == len(self.shapes()), f"{out} lacks decoder linears"
                return {k: handle.get_tensor(k).float() for k in names}
        from safetensors.torch import load_file

        return load_file(out / "weights.safetensors")

    def _from_gguf(self, path: Path) -> dict[str, torch.Tensor]:
        """De-quantize a GGUF (gguf-py, numpy) through transformers' loader into HF names."""
        from transformers import AutoModelForCausalLM

        from liftq_cli.io.checkpoints import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        state = {k: v for k, v in model.state_dict().items() if k in self.params}
        missing = [k for k in self.params if k not in state]
        assert not missing, f"GGUF lacks {missing[:3]}"
        return state

    def cache_file(self, row: Row, out: Path | None) -> Path:
        """Where this row's perplexities are kept: keyed by the evaluation protocol (context,
        the exact token ids of each text) and the identity of the weights file measured."""
        weights = (
            [] if out is None else sorted(out.glob("*.safetensors")) + sorted(out.glob("*.gguf"))
        )
        key = {
            "ctx": CTX,
            "texts": {
                t: hashlib.sha256(ids.numpy().tobytes()).hexdigest()
                for t, ids in self.inputs.eval_ids.items()
            },
            "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights],
            "row": row.id if out is None else str(out.resolve()),
            "base": [
                (f.name, f.stat().st_size) for f in sorted(self.inputs.folder.glob("*.safetensors"))
            ],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return WORK / "eval-cache" / f"{row.id}-{digest}.json"

    def measure(self, row: Row, out: Path | None, progress: bool = True) -> None:
        cache = self.cache_file(row, out)
        if cache.is_file():  # the same weights on the same tokens: reuse the measurement
            saved_ppl = json.loads(cache.read_text())
            row.ppl, row.eval_seconds = saved_ppl["ppl"], saved_ppl["eval_seconds"]
            row.eval_reused = True
            if progress:
                print(f"[{row.id}] ppl {row.ppl} (reused from {cache.name})", flush=True)
        else:
            self._measure(row, out, progress)
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"ppl": row.ppl, "eval_seconds": row.eval_seconds}
            cache.write_text(json.dumps(payload))
        if row.method == "fp":
            row.bits_per_weight, row.total_bytes = 32.0, self.total_params * 4
        else:
            rest = self.total_params - self.linear_weights
            row.total_bytes = (row.total_bytes or 0) + rest * 2
        row.status = "ok"

    def _measure(self, row: Row, out: Path | None, progress: bool) -> None:
        from liftq_cli.evaluate.perplexity import perplexity

        overrides = self.overrides(out) if out is not None else {}
        for name, tensor in overrides.items():
            assert self.params[name].shape == tensor.shape, (name, tensor.shape)
        saved = {name: self.params[name].clone() for name in overrides}
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for name, tensor in overrides.items():
                    self.params[name].copy_(tensor)
            for text, ids in self.inputs.eval_ids.items():
                row.ppl[text] = perplexity(self.model, ids, CTX).ppl
                if progress:
                    print(f"[{row.id}] ppl {text} = {row.ppl[text]:.3f}", flush=True)
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    self.params[name].copy_(tensor)
        row.eval_seconds = time.perf_counter() - start
