"""Seeded calibration sampler: `n` windows of `seqlen` tokens drawn from a text source.

Windows are disjoint slices of the tokenised text, picked by a seeded permutation, so the
same (text, tokenizer, n, seqlen, seed) always gives the same batch. Evaluation sets are
refused: calibrating on the evaluation text would flatter every perplexity we report.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from liftq_cli.data.text import Text
from liftq_cli.errors import BadInputError


@dataclass(frozen=True)
class Calibration:
    """Token windows for calibration plus a fingerprint of everything that produced them."""

    input_ids: torch.Tensor  # int64 [nsamples, seqlen]
    source: str
    seed: int
    fingerprint: str


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` (no special tokens) as a 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str = "calibration text"
) -> torch.Tensor:
    """Pick `nsamples` disjoint windows of `seqlen` tokens from `ids` with a seeded permutation.

    ids: int64 [T]. Returns int64 [nsamples, seqlen].
    """
    if nsamples < 1 or seqlen < 2:
        raise BadInputError(
            f"calibration needs --nsamples >= 1 and --seqlen >= 2 (got {nsamples}, {seqlen})"
        )
    available = ids.numel() // seqlen
    if available < nsamples:
        raise BadInputError(
            f"{source} has {ids.numel()} tokens, fewer than --nsamples {nsamples} x "
            f"--seqlen {seqlen} = {nsamples * seqlen}: use a longer text or fewer samples"
        )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(available, generator=generator)[:nsamples]
    starts = picks * seqlen
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_set(text: Text, tokenizer, nsamples: int, seqlen: int, seed: int) -> Calibration:
    """Calibration windows from a non-evaluation text source."""
    if text.is_eval_set:
        raise BadInputError(
            f"'{text.name}' is an evaluation set and cannot be used for calibration: "
            f"use --calib wiki or a text file of your own"
        )
    ids = tokenize(tokenizer, text.text)
    windows = sample_windows(ids, nsamples, seqlen, seed, f"calibration text '{text.origin}'")
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return Calibration(windows, text.name, seed, digest)
