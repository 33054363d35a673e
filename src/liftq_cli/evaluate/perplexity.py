"""Perplexity over non-overlapping windows (the GPTQ / llama.cpp protocol).

The token stream is cut into `floor(T / ctx)` windows of `ctx` tokens (stride = ctx, the
remainder dropped). Within a window every position but the first is predicted from the ones
before it, so a window scores `ctx - 1` tokens. With `bos_id` set, each window is the BOS
token followed by `ctx - 1` text tokens, and all of them are scored.
ppl = exp(sum of token NLLs / tokens scored), accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from liftq_cli.errors import BadInputError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_mean: float
    tokens: int  # text tokens fed to the model
    tokens_scored: int
    windows: int
    ctx: int
    stride: int
    bos: bool

    def as_dict(self) -> dict:
        return asdict(self)


def make_windows(ids: torch.Tensor, ctx: int, bos_id: int | None = None) -> torch.Tensor:
    """Cut 1-D token ids into non-overlapping windows: int64 [n, ctx]."""
    if ctx < 2:
        raise BadInputError(
            f"--ctx {ctx} is too small: a window needs at least 2 tokens (try 1024)"
        )
    body = ctx - 1 if bos_id is not None else ctx
    n = ids.numel() // body
    if n == 0:
        raise BadInputError(
            f"only {ids.numel()} tokens to evaluate, fewer than one window of --ctx {ctx}: "
            f"lower --ctx or raise --max-tokens"
        )
    windows = ids[: n * body].view(n, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


@torch.inference_mode()
def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window, float64 [n]. windows: int64 [n, ctx]."""
    logits = model(windows).logits.float()
    targets = windows[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.view(windows.shape[0], -1).double().sum(dim=1)


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    ctx: int,
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on token ids (int64 [T]) over non-overlapping `ctx` windows."""
    windows = make_windows(ids, ctx, bos_id)
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and ctx > max_positions:
        raise BadInputError(
            f"--ctx {ctx} exceeds the model's context of {max_positions} tokens: lower --ctx"
        )
    total = 0.0
    n = windows.shape[0]
    for start in range(0, n, batch_size):
        total += float(window_nll(model, windows[start : start + batch_size]).sum())
        if progress is not None:
            progress(min(start + batch_size, n), n)
    scored = n * (ctx - 1)
    mean = total / scored
    return PerplexityResult(
        ppl=math.exp(mean),
        nll_mean=mean,
        tokens=n * (ctx - 1 if bos_id is not None else ctx),
        tokens_scored=scored,
        windows=n,
        ctx=ctx,
        stride=ctx,
        bos=bos_id is not None,
    )
