"""Processes of one quantize job: who holds which calibration windows, who owns which linear,
and the few collectives the block stage needs (torch.distributed, NCCL on GPUs, gloo on CPU).

One process (no torchrun) is world 1 and every collective is a no-op, so the single-process
job runs the same code. Under `torchrun` (or `liftq quantize --nproc N`) each rank joins the
group from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

Every exchange moves whole tensors in a fixed order, and nothing is summed across ranks in
floating point except through `quant/stats.py`'s fixed tree, so results do not depend on the
number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from liftq_cli.errors import BadInputError
from liftq_cli.quant.stats import batch_ranges

TIMEOUT_ENV = "LIFTQ_DIST_TIMEOUT"  # seconds a rank waits for the others (default 1800)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank of world, its compute device, and the device
    tensors travel on (CPU for gloo, the GPU for NCCL)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    wire: torch.device = torch.device("cpu")

    @property
    def root(self) -> bool:
        """Rank 0 owns the work dir, the output and block correction."""
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist

        return dist

    def broadcast(
        self, tensor: torch.Tensor | None, shape, dtype: torch.dtype, src: int
    ) -> torch.Tensor:
        """`tensor` (given on rank `src`, of `shape` and `dtype`) on every rank, on the
        compute device."""
        if self.world == 1:
            assert tensor is not None
            return tensor
        if self.rank == src:
            assert tensor is not None and tensor.dtype == dtype, (tensor, dtype)
            buffer = tensor.detach().to(self.wire).contiguous()
        else:
            buffer = torch.empty(tuple(shape), dtype=dtype, device=self.wire)
        self._dist().broadcast(buffer, src)
        return buffer.to(self.device) if self.rank != src else tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._dist().send(tensor.detach().to(self.wire).contiguous(), dst)

    def recv(self, shape, dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(tuple(shape), dtype=dtype, device=self.wire)
        self._dist().recv(buffer, src)
        return buffer.to(self.device)

    def send_object(self, obj: Any, dst: int) -> None:
        self._dist().send_object_list([obj], dst, device=self.wire)

    def recv_object(self, src: int) -> Any:
        box: list[Any] = [None]
        self._dist().recv_object_list(box, src, device=self.wire)
        return box[0]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        self._dist().broadcast_object_list(box, src, device=self.wire)
        return box[0]

    def all_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        self._dist().all_gather_object(gathered, obj)
        return gathered

    def gather_rows(self, shard: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
        """Concatenate every rank's shard (dim 0, `counts[r]` rows each, rank order) on the
        root; None elsewhere. The root's result lives where its own shard does."""
        if self.world == 1:
            return shard
        if not self.root:
            if counts[self.rank]:
                self.send(shard, 0)
            return None
        parts = [shard]
        for src in range(1, self.world):
            if counts[src]:
                parts.append(self.recv((counts[src], *shard.shape[1:]), shard.dtype, src))
        return torch.cat([p.to(shard.device) for p in parts])

    def scatter_rows(self, full: torch.Tensor | None, counts: list[int], shape, dtype) -> Any:
        """The root's `full` split by `counts` (dim 0): this rank's rows (the root keeps a
        view of its own); `shape` is a row's shape."""
        if self.world == 1:
            return full
        if self.root:
            assert full is not None
            start = counts[0]
            for dst in range(1, self.world):
                if counts[dst]:
                    self.send(full[start : start + counts[dst]], dst)
                start += counts[dst]
            return full[: counts[0]]
        if not counts[self.rank]:
            return torch.empty((0, *shape), dtype=dtype, device=self.device)
        return self.recv((counts[self.rank], *shape), dtype, 0)

    def agree(self, error: BaseException | None) -> None:
        """Fail on every rank when any rank failed: the failing rank re-raises its own error,
        the others raise one line naming it (so no rank is left waiting)."""
        if self.world == 1:
            if error is not None:
                raise error
            return
        message = None if error is None else str(error)
        gathered: list[Any] = [None] * self.world
        self._dist().all_gather_object(gathered, message)
        if error is not None:
            raise error
        for rank, text in enumerate(gathered):
            if text is not None:
                raise BadInputError(f"rank {rank} refused the job: {text}")


def world_from_env() -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise BadInputError(
            "WORLD_SIZE/RANK/LOCAL_RANK are not integers: launch with torchrun or --nproc"
        ) from None
    return rank, world, local


def join(device: torch.device) -> Ranks:
    """This process's Ranks: world 1, or the torchrun group (joined once per process)."""
    rank, world, _ = world_from_env()
    if world <= 1:
        return Ranks(0, 1, device, torch.device("cpu"))
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        seconds = float(os.environ.get(TIMEOUT_ENV, "1800"))
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=seconds), **kwargs)
    wire = device if backend == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device, wire)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


SOLO = Ranks()


@dataclass(frozen=True)
class Team:
    """The ranks of one block stage and how the calibration windows are split among them:
    whole correction batches, contiguous, earlier ranks taking the extra batch
    (`quant/stats.batch_ranges`), so every forward sees the batches a single process does.

    The root holds the full streams (it corrects the block and saves the streams for resume)
    but computes forwards on its own rows only; the other ranks hold their rows alone.
    """

    ranks: Ranks
    batch: int
    windows: int

    def __post_init__(self) -> None:
        if self.ranks.world > self.batches:
            raise BadInputError(
                f"{self.ranks.world} processes but only {self.batches} calibration batches "
                f"(--nsamples {self.windows} / batch {self.batch}): start at most "
                f"{self.batches} processes or pass a larger --nsamples"
            )

    @property
    def batches(self) -> int:
        return -(-self.windows // self.batch)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return batch_ranges(self.batches, self.ranks.world)

    def rows(self, rank: int | None = None) -> slice:
        lo, hi = self.ranges[self.ranks.rank if rank is None else rank]
        return slice(lo * self.batch, min(hi * self.batch, self.windows))

    @property
    def counts(self) -> list[int]:
        return [self.rows(r).stop - self.rows(r).start for r in range(self.ranks.world)]

    @property
    def first_batch(self) -> int:
        return self.ranges[self.ranks.rank][0]

    def local(self, stream: torch.Tensor) -> torch.Tensor:
        """The rows of `stream` this rank computes on (the root's slice of its full stream;
        elsewhere the rank's own shard)."""
        return stream[self.rows(0)] if self.ranks.root and self.ranks.world > 1 else stream

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of one stream, in order, on the root (the shard elsewhere)."""
        full = self.ranks.gather_rows(shard, self.counts)
        return shard if full is None else full
