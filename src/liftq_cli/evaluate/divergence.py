"""KL divergence and top-1 agreement against a full-precision reference, on the same tokens.

The windows are those of the perplexity protocol (`perplexity.make_windows`: non-overlapping
`ctx` windows, stride = ctx, remainder dropped, optional BOS); the scored positions are the
same `ctx - 1` per window. At each one, with p the reference's and q the evaluated model's
next-token distribution:

    KL(p || q) = sum_v p(v) (log p(v) - log q(v))      (nats per token)
    top-1 agreement = [argmax p == argmax q]

both averaged over all scored tokens, summed in float64. The same forward passes also give
the evaluated model's perplexity (bit-identical to `perplexity.perplexity`, which computes it
with the same operations) and the reference's, so nothing runs twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.perplexity import PerplexityResult, make_windows

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DivergenceResult:
    kl_mean: float  # nats per scored token
    kl_max: float  # largest per-token KL
    top1_agreement: float  # fraction of scored tokens where both argmaxes agree
    ref_ppl: float  # the reference's perplexity on the same windows
    tokens_scored: int
    windows: int
    ctx: int
    bos: bool

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WindowStats:
    """Per-window sums over scored positions, all float64 [n] (agree: int64 [n])."""

    kl: torch.Tensor
    kl_max: torch.Tensor
    agree: torch.Tensor
    nll: torch.Tensor
    ref_nll: torch.Tensor


def _nll(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    # Exactly `perplexity.window_nll` on precomputed logits (float32 [n, ctx, V]).
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none"
    )
    return nll.view(windows.shape[0], -1).double().sum(dim=1)


@torch.inference_mode()
def window_stats(
    model: torch.nn.Module, ref: torch.nn.Module, windows: torch.Tensor
) -> WindowStats:
    """KL, agreement and both NLLs of each window. windows: int64 [n, ctx]."""
    logits = model(windows).logits.float()
    ref_logits = ref(windows).logits.float()
    if logits.shape != ref_logits.shape:
        raise BadInputError(
            f"--kld-ref predicts {ref_logits.shape[-1]} tokens but the model {logits.shape[-1]}: "
            "pass the full-precision model this one was quantised from"
        )
    log_q = F.log_softmax(logits[:, :-1], dim=-1)
    log_p = F.log_softmax(ref_logits[:, :-1], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).double()  # [n, ctx - 1]
    agree = (log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).long()
    return WindowStats(
        kl=kl.sum(dim=1),
        kl_max=kl.max(dim=1).values,
        agree=agree.sum(dim=1),
        nll=_nll(logits, windows),
        ref_nll=_nll(ref_logits, windows),
    )


def divergence(
    model: torch.nn.Module,
    ref: torch.nn.Module,
    ids: torch.Tensor,
    ctx: int,
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> tuple[PerplexityResult, DivergenceResult]:
    """The model's perplexity and its divergence from `ref` on token ids (int64 [T])."""
    windows = make_windows(ids, ctx, bos_id)
    for net, what in ((model, "the model"), (ref, "--kld-ref")):
        limit = getattr(getattr(net, "config", None), "max_position_embeddings", None)
        if limit is not None and ctx > limit:
            raise BadInputError(
                f"--ctx {ctx} exceeds the context of {what} ({limit} tokens): lower --ctx"
            )
    n = windows.shape[0]
    kl = nll = ref_nll = 0.0
    kl_max = 0.0
    agree = 0
    for start in range(0, n, batch_size):
        stats = window_stats(model, ref, windows[start : start + batch_size])
        kl += float(stats.kl.sum())
        kl_max = max(kl_max, float(stats.kl_max.max()))
        agree += int(stats.agree.sum())
        nll += float(stats.nll.sum())
        ref_nll += float(stats.ref_nll.sum())
        if progress is not None:
            progress(min(start + batch_size, n), n)
    scored = n * (ctx - 1)
    bos = bos_id is not None
    ppl = PerplexityResult(
        ppl=math.exp(nll / scored),
        nll_mean=nll / scored,
        tokens=n * (ctx - 1 if bos else ctx),
        tokens_scored=scored,
        windows=n,
        ctx=ctx,
        stride=ctx,
        bos=bos,
    )
    div = DivergenceResult(
        kl_mean=kl / scored,
        kl_max=kl_max,
        top1_agreement=agree / scored,
        ref_ppl=math.exp(ref_nll / scored),
        tokens_scored=scored,
        windows=n,
        ctx=ctx,
        bos=bos,
    )
    return ppl, div
