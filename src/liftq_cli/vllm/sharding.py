"""How a packed LiftQuant linear splits over tensor-parallel ranks. Pure: integers in, ranges out.

A linear y = diag(s) Q lift(x) splits two ways:

* column-parallel (q/k/v, gate/up: output rows split): rank r keeps rows [r o/t, (r+1) o/t) of
  `qweight` and `qscale`; the whitening (s1, P1, P2, s2) is over the input, which every rank
  has whole, so it is replicated. Each rank lifts its full input and computes its rows.
* row-parallel (o_proj, down_proj: input split): the lift mixes every input entry (P1 kron P2
  is dense), so it cannot run on a shard of x. Rank r all-gathers x (n values per token, on top
  of the o-value all-reduce that row-parallel layers already do), lifts all of it (a*b*(a+b)
  multiply-adds per token, small next to the GEMV) and multiplies by its own columns of Q:
  the code words [w0, w1) of every row (`word_ranges`). Word boundaries are safe because the
  format-2 interleave moves bits only within a word; the partial outputs then add up, in
  vLLM's all-reduce, to the whole layer's output. Codes stay 1/t per rank; the whitening
  factors (4n + a + b bytes with Hadamard factors) are replicated.
"""

from __future__ import annotations

from liftq_kernels.reference import ROW_ALIGN_WORDS


def word_ranges(total_words: int, world: int) -> list[tuple[int, int]]:
    """Rank r's code words [w0, w1) of a row of `total_words` words split over `world` ranks.

    Boundaries fall on multiples of ROW_ALIGN_WORDS (16 bytes), so every shard keeps the
    aligned loads of the GEMV; shards are as even as that allows and cover the row in order
    (the last ones are shorter, or empty when a row has fewer than world x 4 words).
    """
    if world < 1 or total_words < 0:
        raise ValueError(f"word_ranges: total_words={total_words}, world={world}")
    chunks = -(-total_words // ROW_ALIGN_WORDS)
    per, extra = divmod(chunks, world)
    ranges, start = [], 0
    for rank in range(world):
        stop = min(total_words, start + (per + (rank < extra)) * ROW_ALIGN_WORDS)
        ranges.append((start, stop))
        start = stop
    return ranges


def column_rows(full_rows: int, local_rows: int, rank: int, replicas: int = 1) -> tuple[int, int]:
    """Rows [start, stop) of a column-parallel shard of `local_rows` rows out of `full_rows`.

    `replicas` > 1 when more ranks than key/value heads share one head group (vLLM's
    `num_kv_head_replicas`: ranks r and r + 1 of a pair hold the same k/v rows). A shard that
    is the whole matrix (replicated layer, one rank) starts at 0.
    """
    if local_rows == full_rows:
        return 0, full_rows
    start = (rank // replicas) * local_rows
    if start + local_rows > full_rows:
        raise ValueError(
            f"rank {rank} ({replicas} per group) needs rows [{start}, {start + local_rows}) "
            f"of a matrix with {full_rows}"
        )
    return start, start + local_rows


def fused_rows(
    local_sizes: list[int], full_sizes: list[int], rank: int, replicas: list[int]
) -> list[int]:
    """This rank's rows of a checkpoint linear that is already fused (Phi-3's `qkv_proj`:
    q, k and v stacked), which vLLM shards segment by segment: every segment j of
    `full_sizes[j]` rows gives its column shard of `local_sizes[j]` rows, in segment order."""
    rows, offset = [], 0
    for local, full, rep in zip(local_sizes, full_sizes, replicas, strict=True):
        start, stop = column_rows(full, local, rank, rep)
        rows.extend(range(offset + start, offset + stop))
        offset += full
    return rows
