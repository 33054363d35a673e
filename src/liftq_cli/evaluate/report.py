"""`liftq eval` as a library call: load a model and texts, then measure perplexity on each."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from liftq_cli.data.calibration import tokenize
from liftq_cli.data.text import load_text
from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.divergence import DivergenceResult, divergence
from liftq_cli.evaluate.perplexity import PerplexityResult, perplexity
from liftq_cli.io.checkpoints import LoadedModel, load_model
from liftq_cli.io.quantized import is_quantized_folder
from liftq_cli.version import __version__

ProgressFactory = Callable[[str], Callable[[int, int], None]]


@dataclass
class EvalReport:
    model: str
    folder: str
    ctx: int
    max_tokens: int | None
    bos: bool
    results: dict[str, PerplexityResult] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    kld_ref: str | None = None
    divergence: dict[str, DivergenceResult] = field(default_factory=dict)

    def as_json(self) -> dict:
        first = next(iter(self.results.values()), None)
        extra = {}
        if self.kld_ref is not None:
            extra = {
                "kld_ref": self.kld_ref,
                "kld": {name: d.as_dict() for name, d in self.divergence.items()},
            }
        return {
            "model": self.model,
            "model_folder": self.folder,
            "ppl": {name: r.ppl for name, r in self.results.items()},
            "ctx": self.ctx,
            "tokens": {name: r.tokens for name, r in self.results.items()},
            "seconds": round(self.seconds, 3),
            "protocol": {
                "ctx": self.ctx,
                "stride": first.stride if first else self.ctx,
                "windows": "non-overlapping, remainder dropped",
                "max_tokens": self.max_tokens,
                "bos": self.bos,
                "scored_per_window": self.ctx - 1,
            },
            "results": {name: r.as_dict() for name, r in self.results.items()},
            "sources": self.origins,
            **extra,
            "liftq_version": __version__,
        }


def parse_datasets(spec: str) -> list[str]:
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise BadInputError("--ppl is empty: name at least one text, e.g. --ppl wikitext2")
    return names


def evaluate(
    model_spec: str,
    datasets: list[str],
    ctx: int,
    max_tokens: int | None = None,
    bos: bool = False,
    data_dir: Path | None = None,
    batch_size: int = 1,
    progress: ProgressFactory | None = None,
    kld_ref: str | None = None,
) -> EvalReport:
    """Perplexity of `model_spec` on each dataset; texts are loaded before the model.

    With `kld_ref`, that full-precision model runs on the same windows too, adding the KL
    divergence and top-1 agreement (`evaluate.divergence`) in the same forward passes.
    """
    if ctx < 2:
        raise BadInputError(
            f"--ctx {ctx} is too small: a window needs at least 2 tokens (try 1024)"
        )
    if max_tokens is not None and max_tokens < ctx:
        raise BadInputError(f"--max-tokens {max_tokens} is below --ctx {ctx}: raise it")
    if batch_size < 1:
        raise BadInputError(f"--batch-size {batch_size} must be at least 1")
    texts = [load_text(name, data_dir) for name in datasets]  # fail fast on a bad name
    start = time.perf_counter()
    loaded = _load(model_spec)
    bos_id = loaded.tokenizer.bos_token_id if bos else None
    if bos and bos_id is None:
        raise BadInputError(f"model '{model_spec}' has no BOS token: drop --bos")
    ref = _load_reference(kld_ref, loaded) if kld_ref is not None else None
    report = EvalReport(model_spec, str(loaded.folder), ctx, max_tokens, bos, kld_ref=kld_ref)
    for text in texts:
        ids = tokenize(loaded.tokenizer, text.text)
        if max_tokens is not None:
            ids = ids[:max_tokens]
        check_vocabulary(ids, loaded.model, model_spec)
        callback = progress(text.name) if progress else None
        with torch.inference_mode():
            if ref is not None:
                report.results[text.name], report.divergence[text.name] = divergence(
                    loaded.model, ref, ids, ctx, bos_id, batch_size, callback
                )
            else:
                report.results[text.name] = perplexity(
                    loaded.model, ids, ctx, bos_id=bos_id, batch_size=batch_size, progress=callback
                )
        report.origins[text.name] = text.origin
    report.seconds = time.perf_counter() - start
    return report


def vocabulary(model: torch.nn.Module) -> int:
    """Rows of the model's input embedding: the token ids it can read."""
    return int(model.get_input_embeddings().num_embeddings)


def check_vocabulary(ids: torch.Tensor, model: torch.nn.Module, spec: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model)."""
    top = int(ids.max()) if ids.numel() else -1
    if top >= vocabulary(model):
        raise BadInputError(
            f"the tokenizer of '{spec}' yields token id {top} but the model has only "
            f"{vocabulary(model)} embeddings: its tokenizer files belong to another model"
        )


def _load(spec: str) -> LoadedModel:
    """A model spec, or a `liftq quantize` output (its weights reconstructed in memory)."""
    if is_quantized_folder(Path(spec).expanduser()):
        from liftq_cli.runtime.quantized import load_quantized

        return load_quantized(Path(spec).expanduser())
    return load_model(spec)


def _load_reference(spec: str, loaded: LoadedModel) -> torch.nn.Module:
    """The --kld-ref model; it must share the evaluated model's tokenizer vocabulary."""
    ref = _load(spec)
    if ref.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():
        raise BadInputError(
            f"--kld-ref '{spec}' has a different tokenizer vocabulary from the model: pass the "
            f"full-precision model it was quantised from"
        )
    if vocabulary(ref.model) != vocabulary(loaded.model) or (
        ref.model.config.vocab_size != loaded.model.config.vocab_size
    ):
        raise BadInputError(
            f"--kld-ref '{spec}' has a vocabulary of {vocabulary(ref.model)} tokens, the model "
            f"{vocabulary(loaded.model)}: pass the full-precision model it was quantised from"
        )
    return ref.model


def speed(
    model_spec: str,
    ref_spec: str | None,
    device_spec: str,
    prompt: int,
    new: int,
    batch: int,
):
    """`liftq eval --speed`: tokens/s and peak memory of the model (and the reference) on the
    device; on CUDA with `liftq plan`'s prediction for the same ctx (prompt + new) and batch
    when the model is a packed folder (`evaluate.speed`)."""
    from liftq_cli.evaluate.speed import planned_gpu_bytes, run_speed
    from liftq_cli.quant.device import resolve_device

    device = resolve_device(device_spec)
    loaded = _load(model_spec)
    reference = _load_reference(ref_spec, loaded) if ref_spec is not None else None
    timing = run_speed(
        loaded.model, reference, device, vocabulary(loaded.model), prompt, new, batch
    )
    if device.type == "cuda":
        timing.planned_bytes = planned_gpu_bytes(loaded.folder, prompt + new, batch)
    return timing
