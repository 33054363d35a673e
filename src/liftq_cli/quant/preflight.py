"""Preflight of `liftq quantize`: what the job needs against what this machine has, as a
table (`render`) and a one-line refusal (`check`) before any work starts.

    disk work dir, disk output (and both together when they share a file system),
    host RAM, the memory of every rank's device    quant/footprint.py (formulas there)
    seconds per block and in total                 quant/costmodel.py

Only the probes (`host_memory`, `device_memory`, `disk_free`, `dir_bytes` and
`quant/cost_probe.measure_cpu_coefficients`, which times tiny stages) look at the machine;
`plan` takes their results, so every figure can be checked with injected ones. The checks
run in a fixed order, the disks, host RAM, then each device, and the first shortfall is
refused in one line naming the need, what is free and the fix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from liftq_cli.errors import DoesNotFitError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import Architecture
from liftq_cli.plan.memory import format_bytes
from liftq_cli.quant.costmodel import (
    BlockEstimate,
    Coefficients,
    estimate,
    kind_from_name,
)
from liftq_cli.quant.footprint import (
    block_peak,
    device_parts,
    host_parts,
    live_streams,
    output_bytes,
    stream_placement,
    stream_shard,
    work_dir_bytes,
)
from liftq_cli.quantize_job import QuantizeJob

# -- probes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostMemory:
    available: int  # bytes, MemAvailable
    total: int


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # cuda:N
    name: str  # NVIDIA H100 80GB HBM3
    free: int  # bytes, torch.cuda.mem_get_info
    total: int


@dataclass(frozen=True)
class DiskSpace:
    path: Path  # the nearest existing folder of the path asked about
    free: int  # bytes
    device: int  # st_dev: two paths on one file system share it


def host_memory() -> HostMemory:
    """MemAvailable and MemTotal from /proc/meminfo (else os.sysconf)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = {k: int(v.split()[0]) * 1024 for k, v in fields.items() if v.strip()}
        return HostMemory(kib["MemAvailable"], kib["MemTotal"])
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES") * page
        return HostMemory(avail, os.sysconf("SC_PHYS_PAGES") * page)


def device_memory(device: str) -> DeviceMemory | None:
    """Free and total memory of `device` (auto, cpu, cuda, cuda:N); None where it is the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    index = int(device[5:]) if device.startswith("cuda:") else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(f"cuda:{index}", torch.cuda.get_device_name(index), free, total)


def disk_free(path: Path) -> DiskSpace:
    """Free bytes of the file system that `path` (or its nearest existing parent) is on."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return DiskSpace(probe, shutil.disk_usage(probe).free, os.stat(probe).st_dev)


def dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if absent): a resumed work dir's own share."""
    root = Path(path)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


# -- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One row of the plan: what the job needs of a resource and what there is."""

    name: str  # host RAM, cuda:0 NVIDIA H100 80GB HBM3, disk work dir, ...
    need: int
    available: int | None  # None: not probed
    parts: dict[str, int]
    fix: str = ""  # the one-line refusal when it does not fit

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= self.available


@dataclass(frozen=True)
class Preflight:
    """Needs against availability for one job on `world` processes, and the time estimate."""

    model: str
    config: str
    world: int
    placement: str  # the streams: device or host
    resources: tuple[Resource, ...]
    estimate: BlockEstimate


def _gb(n: float) -> str:
    return format_bytes(int(n))


def _device_need(
    arch: Architecture, job: QuantizeJob, world: int, free: int, rank: int = 0
) -> tuple[int, str]:
    """(bytes rank `rank`'s device needs, where its streams go) for a device with `free`
    bytes: rank 0 holds the full streams, the others their shard."""
    parts = device_parts(arch, job, world)
    held = stream_shard(job.settings, arch, 1 if rank == 0 else world)
    streams = live_streams(job.settings) * held
    placement = stream_placement(streams, free, block_peak(parts))
    return block_peak(parts) + (streams if placement == "device" else 0), placement


def _fewer_samples(job: QuantizeJob, fits: Callable[[QuantizeJob], bool]) -> str:
    """'pass --nsamples K (now N), ' for the largest halving K of N that fits, else ''."""
    n = job.settings.calibration.nsamples
    for k in (n >> i for i in range(1, n.bit_length())):
        calib = replace(job.settings.calibration, nsamples=k)
        if fits(replace(job, settings=replace(job.settings, calibration=calib))):
            return f"pass --nsamples {k} (now {n}), "
    return ""


def _device_fix(arch: Architecture, job: QuantizeJob, world: int, free: int) -> str:
    def fits(j: QuantizeJob, w: int = world) -> bool:
        return _device_need(arch, j, w, free)[0] <= free

    wider = next((w for w in (2 * world, 4 * world, 8 * world) if fits(job, w)), None)
    more = f"run more processes (--nproc {wider}), " if wider else ""
    return f"{_fewer_samples(job, fits)}{more}or use a GPU with more memory".removeprefix("or ")


def _host_fix(fits: Callable[[QuantizeJob], bool], job: QuantizeJob, world: int, worst: str) -> str:
    more = "or use a machine with more RAM"
    if worst == "fine-tuning":
        return f"pass --finetune-steps 0 (it holds two fp32 copies of the model) {more}"
    if worst == "--mixed":
        return f"drop --mixed (its Fisher pass holds the whole fp32 model) {more}"
    fewer = " or fewer processes" if world > 1 else ""
    return f"{_fewer_samples(job, fits)}{more}{fewer}".removeprefix("or ")


def _disk_rows(
    job: QuantizeJob, work: dict[str, int], out: dict[str, int], disks: tuple[DiskSpace, DiskSpace]
) -> list[Resource]:
    """Work dir and output (and both together when they share a file system)."""
    rows = []
    for flag, name, path, parts, disk in (
        ("--work-dir", "work dir", job.work, work, disks[0]),
        ("--out", "output", job.out, out, disks[1]),
    ):
        need = sum(parts.values())
        why = f"{flag} {path} needs {_gb(need)} on disk but {_gb(disk.free)} is free"
        fix = f"free {_gb(need - disk.free)} or pass {flag} on a larger disk"
        rows.append(Resource(f"disk {name}", need, disk.free, parts, f"{why}: {fix}"))
    if disks[0].device == disks[1].device:
        need, free = rows[0].need + rows[1].need, disks[0].free
        why = f"--work-dir {job.work} and --out {job.out} share one disk and need {_gb(need)}"
        fix = f"free {_gb(need - free)} or put --work-dir on another disk"
        line = f"{why} together but {_gb(free)} is free: {fix}"
        rows.append(Resource("disk work dir + output", need, free, {}, line))
    return rows


def _probe_devices(device: str, world: int) -> list[DeviceMemory]:
    """Rank r's device: cuda:r (one process: cuda:K for --device cuda:K); [] on a CPU."""
    if device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    base = int(device[5:]) if device.startswith("cuda:") and world == 1 else 0
    local = min(world, torch.cuda.device_count() - base)  # this node's share of the ranks
    return [d for r in range(local) if (d := device_memory(f"cuda:{base + r}")) is not None]


def plan(
    job: QuantizeJob,
    arch: Architecture,
    world: int = 1,
    host: HostMemory | None = None,
    devices: Sequence[DeviceMemory] | None = None,
    disk: Callable[[Path], DiskSpace] = disk_free,
    work_used: int | None = None,
    coefficients: Coefficients | None = None,
    dtype_bytes: int = 2,
    beam: Callable[[LatticeConfig], int] | None = None,
) -> Preflight:
    """Every figure of quant/footprint.py and the time estimate for `job` on `world`
    processes, against the probes (each injectable; by default this machine's).

    devices: one per rank ([]: the job runs on the CPU; default: probed, cuda:r on
    this node, or cuda:K for one process on --device cuda:K); work_used: bytes a resumed
    work dir already holds (counted as free);
    dtype_bytes: of the source's unquantized tensors (a preset has no weights: bf16, 2);
    beam: the search beam of a config (default: its catalog entry's). Each rank places its
    own streams (rank 0 holds them in full); the table shows rank 0's placement.
    """
    host = host or host_memory()
    devices = _probe_devices(job.device, world) if devices is None else list(devices)
    used = dir_bytes(job.work) if work_used is None else work_used
    work_disk, out_disk = disk(job.work), disk(job.out)
    work_disk = replace(work_disk, free=work_disk.free + used)  # its own files are replaced
    work, out = work_dir_bytes(arch, job), output_bytes(arch, job, dtype_bytes)
    rows = _disk_rows(job, work, out, (work_disk, out_disk))
    placement, device_rows = "host", []
    for rank, dev in enumerate(devices):
        need, where = _device_need(arch, job, world, dev.free, rank)
        placement = where if rank == 0 else placement
        fix = _device_fix(arch, job, world, dev.free)
        parts = device_parts(arch, job, world)
        parts["streams"] = need - block_peak(parts)
        why = f"{dev.device} ({dev.name}) needs {_gb(need)} per block but {_gb(dev.free)} is free"
        device_rows.append(
            Resource(f"{dev.device} {dev.name}", need, dev.free, parts, f"{why}: {fix}")
        )

    def host_fits(j: QuantizeJob) -> bool:
        return host_parts(arch, j, world, placement, not devices)["block stage"] <= host.available

    parts = host_parts(arch, job, world, placement, not devices)
    worst = max(parts, key=lambda k: parts[k])
    needed, available = _gb(parts[worst]), _gb(host.available)
    why = f"host RAM: the job needs {needed} ({worst}) but {available} is available"
    line = f"{why}: {_host_fix(host_fits, job, world, worst)}"
    rows += [Resource("host RAM", parts[worst], host.available, parts, line), *device_rows]
    kind = kind_from_name(devices[0].name) if devices else "cpu"
    settings, config_for = job.settings, job.config_for
    est = estimate(
        arch, settings, job.lattice, kind, world, coefficients, config_for, beam, job.tf32
    )
    return Preflight(job.model, job.lattice.name, world, placement, tuple(rows), est)


def render(pre: Preflight) -> str:
    """The plan as an aligned table, then the cost arithmetic of one block."""
    est = pre.estimate
    rows = [("resource", "need", "free")]
    for r in pre.resources:
        free = "?" if r.available is None else _gb(r.available) + ("" if r.fits else "  SHORT")
        rows.append((r.name, _gb(r.need), free))
    kind = est.coefficients.kind + (" (estimate)" if est.is_estimate else "")
    rows.append((f"time per block, {kind}", f"{est.seconds_per_block:.1f} s", ""))
    rows.append((f"time, {est.layers} blocks", f"{est.total_seconds / 3600:.2f} h", ""))
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    procs = f"{pre.world} process" + ("es" if pre.world > 1 else "")
    lines = [f"preflight: {pre.model} at {pre.config}, {procs}, streams on the {pre.placement}"]
    lines += [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c}".rstrip() for a, b, c in rows]
    lines.append("  cost of one block:")
    return "\n".join(lines + ["    " + line for line in est.how().splitlines()])


def summary(pre: Preflight) -> str:
    """The plan in one line, for the head of a real run's log (`render` is the table)."""
    rows = list(pre.resources)
    if any(r.name == "disk work dir + output" for r in rows):  # one disk: the sum says it all
        rows = [r for r in rows if r.name not in ("disk work dir", "disk output")]
    parts = []
    for r in rows:
        free = "?" if r.available is None else _gb(r.available)
        parts.append(f"{r.name.split(' ')[0] if r.name.startswith('cuda') else r.name} "
                     f"{_gb(r.need)} of {free}")  # fmt: skip
    est = pre.estimate
    kind = est.coefficients.kind + (" estimate" if est.is_estimate else "")
    return f"preflight: {', '.join(parts)}; ~{est.seconds_per_block:.1f} s/block ({kind})"


def check(pre: Preflight) -> None:
    """Raise DoesNotFitError with one line for the first resource that does not fit, in the
    order of `plan`'s rows: the disks, host RAM, then each device."""
    for resource in pre.resources:
        if not resource.fits:
            raise DoesNotFitError(resource.fix)


def as_json(pre: Preflight) -> dict:
    """The plan as JSON: every resource's need, free bytes and parts, and the estimate."""
    est = pre.estimate
    return {
        "model": pre.model,
        "config": pre.config,
        "processes": pre.world,
        "streams_on": pre.placement,
        "resources": [
            {"name": r.name, "need": r.need, "free": r.available, "fits": r.fits, "parts": r.parts}
            for r in pre.resources
        ],
        "estimate": {
            "device_kind": est.coefficients.kind,
            "is_estimate": est.is_estimate,
            "source": est.coefficients.source,
            "seconds_per_block": est.seconds_per_block,
            "blocks": est.layers,
            "seconds": est.total_seconds,
            "stages": {st.stage: st.seconds for st in est.stages},
        },
    }
