"""Preflight of `liftq quantize` on the llama-70b preset (no weights needed): every disk and
memory figure is recomputed here from the published Llama-3-70B shapes with the formulas of
quant/footprint.py written out again, a job that cannot fit is refused in one line, and the
cost model's fit and sums are checked."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from liftq_cli.errors import DoesNotFitError
from liftq_cli.io.packed_format import packed_linear_bytes, words_per_row
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import resolve_architecture
from liftq_cli.plan.memory import format_bytes
from liftq_cli.quant.cost_inputs import stats_passes
from liftq_cli.quant.costmodel import (
    STAGES,
    Coefficients,
    Sample,
    block_work,
    coefficients_for,
    comm_bytes,
    estimate,
    fit,
    forward_flops,
    linear_stage_units,
    report_samples,
    shared_stage_units,
)
from liftq_cli.quant.footprint import stream_placement, stream_shard
from liftq_cli.quant.preflight import (
    DeviceMemory,
    DiskSpace,
    HostMemory,
    check,
    disk_free,
    host_memory,
    plan,
    render,
)
from liftq_cli.quantize_job import QuantizeJob

# Llama-3-70B, as published: hidden 8192, intermediate 28672, 80 layers, 64 heads of 128,
# 8 KV heads, vocabulary 128256, untied lm_head, 2 RMSNorms a block and a final one.
H, INTER, LAYERS, HEADS, KV, VOCAB = 8192, 28672, 80, 64, 8 * 128, 128256
LINEARS = [
    (H, H),
    (KV, H),
    (KV, H),
    (H, H),
    (INTER, H),
    (INTER, H),
    (H, INTER),
]  # (out, in), q..down
FACTORS = {8192: (64, 128), 28672: (128, 224)}  # the Kronecker pair closest to sqrt(n)
WORDS = {8192: 615, 28672: 2151}  # LQ-24/10: ceil(ceil(n / 10) * 24 / 32)
BITS = {8192: 820 * 24, 28672: 2868 * 24}  # code bits of a row
NORMS = LAYERS * 2 * H + H
HDR = 160
N, SEQ, BATCH = 64, 512, 2  # the default calibration and correction batch
STREAM = N * SEQ * H * 4
GRAMS = 3 * H * H + INTER * INTER  # q/k/v input, o input, gate/up input, down input
# staged jobs (--true-sequential --compensate): statistics live one dataflow stage at a time,
# each linear's cross sum y_f^T x (out x in) beside its input's Gram; the down_proj stage is
# the largest
STAGE_G = INTER * INTER + H * INTER
LINEAR_PARAMS = sum(o * n for o, n in LINEARS)
GB = 10**9
H100 = DeviceMemory("cuda:0", "NVIDIA H100 80GB HBM3", 84_500_000_000, 85_029_158_912)


def h100s(count: int) -> list[DeviceMemory]:
    return [DeviceMemory(f"cuda:{r}", H100.name, H100.free, H100.total) for r in range(count)]


BIG_HOST = HostMemory(2000 * GB, 2048 * GB)


def beam(_cfg: LatticeConfig) -> int:
    return 64


def roomy(path: Path) -> DiskSpace:
    return DiskSpace(Path("/"), 10_000 * GB, 1)


@pytest.fixture(scope="module")
def arch():
    return resolve_architecture("llama-70b")


@pytest.fixture(params=["default", "staged"])
def job(tmp_path, request):
    from liftq_cli.quantize_job import QuantizeSettings

    staged = request.param == "staged"
    return QuantizeJob(
        model="llama-70b",
        out=tmp_path / "o",
        lattice=LatticeConfig.parse("LQ-24/10"),
        settings=QuantizeSettings(true_sequential=staged, compensate=staged),
    )


def live_stats(job) -> int:
    """G' of the footprint: the Grams (and cross sums) live at once."""
    return STAGE_G if job.settings.true_sequential else GRAMS


def state(o: int, n: int) -> int:
    a, b = FACTORS[n]
    return 4 * o * WORDS[n] + 4 * o + 8 * n + 4 * (a * a + b * b)


def rows(pre):
    return {r.name: r for r in pre.resources}


def refusal(pre) -> str:
    """`check`'s one-line refusal of `pre`."""
    with pytest.raises(DoesNotFitError) as err:
        check(pre)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_shapes_written_out_agree_with_the_packed_format():
    cfg = LatticeConfig(24, 10)
    for o, n in LINEARS:
        # the work dir keeps the plain bitstream; the packed file pads long rows to 16 bytes
        assert words_per_row(n, cfg, version=1) == WORDS[n]
        assert packed_linear_bytes(o, n, cfg)["codes"] == 4 * o * (-(-WORDS[n] // 4) * 4)


def test_disk_figures_of_llama_70b_follow_the_formulas(arch, job):
    pre = plan(job, arch, host=BIG_HOST, devices=[H100], disk=roomy, work_used=0, beam=beam)
    got = rows(pre)
    blocks = LAYERS * (sum(state(o, n) + 16 + 7 * HDR for o, n in LINEARS) + 4096)
    streams = 2 * 2 * STREAM + 4 * HDR  # fp and quant, old and new file while replacing
    assert got["disk work dir"].parts == {"blocks": blocks, "streams": streams}
    codes = LAYERS * sum(state(o, n) + 6 * HDR for o, n in LINEARS) + 4 * 10 * 24 + HDR
    linear_params = LAYERS * sum(o * n for o, n in LINEARS)
    rest = 2 * (arch.published_params - linear_params) + HDR * (2 * LAYERS + 3)
    assert rest == 2 * (2 * VOCAB * H + NORMS) + HDR * (2 * LAYERS + 3)
    assert got["disk output"].parts == {"codes": codes, "unquantized": rest, "files": 32 * 10**6}
    assert got["disk work dir + output"].need == blocks + streams + codes + rest + 32 * 10**6
    assert 24 * GB < got["disk work dir"].need < 26 * GB  # about 2.4 bits of 68.5e9 weights


def test_memory_figures_of_llama_70b_follow_the_formulas(arch, job):
    pre = plan(job, arch, host=BIG_HOST, devices=[H100], disk=roomy, work_used=0, beam=beam)
    got = rows(pre)
    weights = 4 * (sum(o * n for o, n in LINEARS) + 2 * H)
    depth = 1 + math.ceil(math.log2(N // BATCH))  # 32 batches: 6 partials in the tree
    workspace = max(max(4 * n * n + 40 * o * n, 44 * n * n + 8 * o * n) for o, n in LINEARS)
    activations = 4 * BATCH * SEQ * (10 * H + 3 * INTER) + 4 * BATCH * HEADS * SEQ * SEQ
    # on a GPU each weight's reconstruction is recomputed in backward: one linear's at a time
    correct = sum(16 * o * BITS[n] + 16 * (o + 2 * n) + 4 * o * n for o, n in LINEARS)
    correct += max(4 * o * BITS[n] + 16 * o * n for o, n in LINEARS)
    correct += activations  # the statistics are freed before correction
    g = live_stats(job)
    encode = 4 * g + workspace
    if job.settings.compensate:  # the fp64 cross sums, the encoded linears' original weights
        encode += 4 * g + 4 * LINEAR_PARAMS
    peak = weights + max(8 * g * depth, encode, correct)
    # at 2.4 bits the Gram tree's fp64 partials are the peak, correction a close second
    assert peak == weights + 8 * g * depth and correct > 0.8 * 8 * g * depth
    assert H100.free - peak >= 2 * 4 * STREAM  # so the 4 live streams go on the device
    device = got["cuda:0 NVIDIA H100 80GB HBM3"]
    assert device.need == peak + 4 * STREAM
    assert device.parts == {
        "weights": weights,
        "stats": 8 * g * depth,
        "encode": encode,
        "correct": correct,
        "streams": 4 * STREAM,
    }
    assert pre.placement == "device"
    host = 8 * N * SEQ + 1_500_000_000 + max(4 * VOCAB * H, weights) + 2 * STREAM
    assert got["host RAM"].parts == {"block stage": host}


def test_with_two_processes_rank_0_keeps_the_full_streams_and_rank_1_half(arch, job):
    assert stream_shard(job.settings, arch, 2) * 2 == stream_shard(job.settings, arch, 1)
    one, two = (plan(job, arch, w, BIG_HOST, h100s(w), roomy, 0, beam=beam) for w in (1, 2))
    assert [r.parts["streams"] for r in rows(two).values() if r.name.startswith("cuda")] == [
        4 * STREAM,
        2 * STREAM,
    ]
    assert rows(one)["cuda:0 NVIDIA H100 80GB HBM3"].parts["streams"] == 4 * STREAM
    depth = 1 + math.ceil(math.log2(N // 2 // BATCH))  # 16 batches a rank: one partial fewer
    stats = rows(two)["cuda:0 NVIDIA H100 80GB HBM3"].parts["stats"]
    assert stats == 8 * live_stats(job) * depth
    # streams on the devices: the host holds rank 0's copy for the work dir, once
    host = 2 * (8 * N * SEQ + 1_500_000_000 + 4 * VOCAB * H) + 2 * STREAM
    assert rows(two)["host RAM"].parts == {"block stage": host}


def test_the_communication_of_a_block_follows_its_formula(arch, job):
    work = block_work(arch, 0, job.config_for, beam)
    assert comm_bytes(work, arch, job.settings, 1) == 0
    world, nodes = 8, 1 + math.ceil(math.log2(N // 8 // BATCH))  # 4 batches a rank: 3 nodes
    grams = 8 * (3 * H * (H + 1) + INTER * (INTER + 1))  # q/k/v share, gate/up share
    grams += 8 * LINEAR_PARAMS * job.settings.compensate  # each linear's cross sum
    states = sum(state(o, n) for o, n in LINEARS)
    latents = sum(4 * (o * BITS[n] + o + 2 * n) for o, n in LINEARS)
    want = 7 * nodes * grams / 8 + states + 2 * 7 / 8 * STREAM + 7 * latents
    assert comm_bytes(work, arch, job.settings, world) == pytest.approx(want)


def test_a_tiny_disk_is_refused_in_one_line_naming_need_and_free(arch, job):
    def tiny(path: Path) -> DiskSpace:
        return DiskSpace(Path("/"), 1 * GB, 1)

    pre = plan(job, arch, host=BIG_HOST, devices=[H100], disk=tiny, work_used=0, beam=beam)
    need = rows(pre)["disk work dir"].need
    assert refusal(pre) == (
        f"--work-dir {job.work} needs {format_bytes(need)} on disk but 1.00 GB is free: free "
        f"{format_bytes(need - GB)} or pass --work-dir on a larger disk"
    )
    assert "SHORT" in render(pre)


def test_work_dir_and_output_on_one_disk_are_checked_together(arch, job):
    pre = plan(job, arch, host=BIG_HOST, devices=[H100], disk=roomy, work_used=0, beam=beam)
    both = rows(pre)["disk work dir + output"].need

    def between(path: Path) -> DiskSpace:  # each alone fits, both do not
        return DiskSpace(Path("/"), both - 1, 1)

    pre = plan(job, arch, host=BIG_HOST, devices=[H100], disk=between, work_used=0, beam=beam)
    with pytest.raises(DoesNotFitError, match="share one disk.*put --work-dir on another disk"):
        check(pre)
    apart = plan(
        job, arch, host=BIG_HOST, devices=[H100], beam=beam, work_used=0,
        disk=lambda p: DiskSpace(Path("/"), both - 1, hash(p)),
    )  # fmt: skip
    check(apart)


def test_a_tiny_host_ram_is_refused_in_one_line(arch, job):
    small = HostMemory(4 * GB, 8 * GB)
    pre = plan(job, arch, host=small, devices=[H100], disk=roomy, work_used=0, beam=beam)
    need = rows(pre)["host RAM"].need
    assert refusal(pre) == (
        f"host RAM: the job needs {format_bytes(need)} (block stage) but 4.00 GB is "
        "available: use a machine with more RAM"
    )


def test_fine_tuning_on_the_host_names_its_own_fix(arch, tmp_path):
    from liftq_cli.quantize_job import FinetuneConfig, QuantizeSettings

    settings = QuantizeSettings(finetune=FinetuneConfig(steps=10))
    job = QuantizeJob("llama-70b", tmp_path / "o", LatticeConfig(24, 10), settings=settings)
    pre = plan(job, arch, host=HostMemory(512 * GB, 600 * GB), devices=[H100], disk=roomy,
               work_used=0, beam=beam)  # fmt: skip
    assert rows(pre)["host RAM"].parts["fine-tuning"] > 8 * arch.published_params
    with pytest.raises(DoesNotFitError, match=r"\(fine-tuning\).*--finetune-steps 0"):
        check(pre)


def test_a_small_gpu_is_refused_and_fewer_samples_are_offered_only_when_they_fit(arch, job):
    small = DeviceMemory("cuda:0", "NVIDIA A100-SXM4-40GB", 40 * GB, 42 * GB)
    pre = plan(job, arch, host=BIG_HOST, devices=[small], disk=roomy, work_used=0, beam=beam)
    with pytest.raises(DoesNotFitError) as err:
        check(pre)
    # correction state alone exceeds 40 GB and is not split: no --nsamples, no --nproc fix
    assert str(err.value).endswith("is free: use a GPU with more memory")
    assert str(err.value).startswith("cuda:0 (NVIDIA A100-SXM4-40GB) needs ")
    mid = DeviceMemory("cuda:0", "NVIDIA H100 80GB HBM3", 60 * GB, 80 * GB)
    pre = plan(job, arch, host=BIG_HOST, devices=[mid], disk=roomy, work_used=0, beam=beam)
    check(pre)  # the streams move to the host and the block still fits
    assert pre.placement == "host"


def test_stream_placement_keeps_half_of_what_is_left():
    assert stream_placement(10, 100, 80) == "device"
    assert stream_placement(11, 100, 80) == "host"
    assert stream_placement(1, 100, 100) == "host"


def test_render_prints_every_row_and_marks_datasheet_estimates(arch, job):
    pre = plan(job, arch, 8, BIG_HOST, h100s(8), roomy, 0, beam=beam)
    text = render(pre)
    for name in ("disk work dir", "disk output", "host RAM", "cuda:7 NVIDIA H100", "80 blocks"):
        assert name in text
    assert "time per block, h100 (estimate)" in text
    assert "not split over ranks" in text and "comm" in text


def test_the_estimate_is_the_sum_of_its_stages(arch, job):
    for world in (1, 8):
        est = estimate(arch, job.settings, job.lattice, "h100", world, beam=beam)
        assert est.seconds_per_block == pytest.approx(
            sum(s.units * s.coefficient for s in est.stages)
        )
        assert est.total_seconds == pytest.approx(80 * est.seconds_per_block)
        lines = est.how().splitlines()
        assert len(lines) == len(est.stages) + 1
        for stage, line in zip(est.stages, lines, strict=False):
            assert line.startswith(stage.stage) and f"{stage.seconds:9.2f} s" in line
    one = estimate(arch, job.settings, job.lattice, "h100", 1, beam=beam)
    stats = next(s for s in one.stages if s.stage == "stats")
    cross = LINEAR_PARAMS * job.settings.compensate  # the cross sums beside the Grams
    assert stats.units == 2 * N * SEQ * (GRAMS + cross)
    encode = next(s for s in one.stages if s.stage == "encode")
    assert encode.units == sum(o * math.ceil(n / 10) * 64 * 24 for o, n in LINEARS)
    eight = estimate(arch, job.settings, job.lattice, "h100", 8, beam=beam)
    per = {s.stage: s.units for s in eight.stages}
    assert per["stats"] == stats.units / 8
    assert per["whiten"] < next(s.units for s in one.stages if s.stage == "whiten")


def test_fit_recovers_known_coefficients_from_synthetic_samples():
    rng = random.Random(0)
    truth = {s: rng.uniform(1e-12, 1e-9) for s in STAGES}
    samples = []
    for _ in range(40):
        units = {s: rng.uniform(1e8, 1e11) for s in rng.sample(STAGES, 3)}
        samples.append(Sample(units, sum(truth[s] * u for s, u in units.items())))
    base = Coefficients("cpu", {s: 3 * c for s, c in truth.items()}, "off by 3x")
    fitted = fit(samples, base)
    for s in STAGES:
        assert fitted.seconds[s] == pytest.approx(truth[s], rel=1e-4)
    assert fitted.measured_here and not coefficients_for("h100").measured_here


def test_fit_keeps_the_base_ratio_where_samples_cannot_separate_stages():
    base = coefficients_for("cpu")
    joint = [Sample({"stats": 1e10, "forward": 2e10}, 4.0)]  # stats and forward always together
    fitted = fit(joint, base)
    ratio = fitted.seconds["stats"] / fitted.seconds["forward"]
    assert ratio == pytest.approx(base.seconds["stats"] / base.seconds["forward"], rel=1e-3)
    predicted = 1e10 * fitted.seconds["stats"] + 2e10 * fitted.seconds["forward"]
    assert predicted == pytest.approx(4.0, rel=1e-3)
    assert fitted.seconds["encode"] == base.seconds["encode"]  # no sample: unchanged


def test_the_catalog_beam_and_cpu_coefficients_are_used_by_default(arch, job):
    est = estimate(arch, job.settings, job.lattice, "cpu")
    encode = next(s for s in est.stages if s.stage == "encode")
    assert encode.units == sum(o * math.ceil(n / 10) * 64 * 24 for o, n in LINEARS)
    assert est.is_estimate and "quantize_scaling" in est.coefficients.source


def test_the_probes_read_this_machine(tmp_path):
    host = host_memory()
    assert 0 < host.available <= host.total
    disk = disk_free(tmp_path / "not" / "yet")
    assert disk.path == tmp_path and disk.free > 0


def test_block_reports_fit_the_stages_they_time(arch, job):
    work = block_work(arch, 0, job.config_for, beam)
    settings = job.settings
    truth = dict(coefficients_for("h100").seconds)
    truth |= {"whiten": 2 * truth["whiten"], "correct": 0.5 * truth["correct"]}
    linear = [linear_stage_units(lin, settings) for lin in work]
    shared = shared_stage_units(work, arch, settings)
    whiten = sum(u["whiten"] for u in linear) * truth["whiten"]
    encode = sum(u["encode"] * truth["encode"] + u["ldlq"] * truth["ldlq"] for u in linear)
    correct = shared["correct"] * truth["correct"]
    # the statistics run the block once per stage, and the full-precision one beside it
    passes = stats_passes(work, settings)
    assert passes == (8 if settings.compensate else 1)  # staged: 4 stages x 2
    one_pass = forward_flops(work, arch, N * SEQ, SEQ) * passes
    stats = shared["stats"] * truth["stats"] + one_pass * truth["forward"]
    report = {"seconds": whiten + encode + correct + stats, "seconds_whiten": whiten}
    report |= {"seconds_encode": encode, "seconds_correct": correct}
    fitted = fit(report_samples(work, arch, settings, [report]), coefficients_for("h100"))
    for stage in ("whiten", "correct"):
        assert fitted.seconds[stage] == pytest.approx(truth[stage], rel=1e-3)
