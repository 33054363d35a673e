"""The quality bench's liftq rows (bits accounting, reuse, calibration check, the CLI call)
and its regression check. Fast, synthetic: no model, no peer venv."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from bench.quality_liftq import calibration_mismatch, liftq_storage_bits, prepare_liftq_row
from bench.quality_report import Row, markdown, regressions

from bench import quality_liftq

# SmolLM2-135M's seven decoder linears of one block: (out, in).
BLOCK = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}


def shapes(layers: int = 2) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{k}.weight": v for i in range(layers) for k, v in BLOCK.items()}


def configs(cfg: str, layers: int = 2) -> dict[str, str]:
    return {k.removesuffix(".weight"): cfg for k in shapes(layers)}


def test_liftq_bits_of_one_linear_by_hand():
    # LQ-24/10 on 576 x 576: 58 slices x 24 bits = 1392 bits -> 44 words = 176 B per row;
    # 576 fp16 row scales; whitening s1, s2 (576 each) and P1, P2 (24 x 24 each) in fp16;
    # the 10 x 24 fp32 lattice matrix once.
    key = "model.layers.0.self_attn.q_proj"
    bits, weights, rule = liftq_storage_bits({key: "LQ-24/10"}, {f"{key}.weight": (576, 576)})
    expected_bytes = 576 * 176 + 2 * 576 + 2 * (2 * 576 + 24 * 24 + 24 * 24) + 4 * 10 * 24
    assert (bits, weights) == (expected_bytes * 8, 576 * 576)
    assert "LQ-24/10" in rule


def test_trained_rotations_pay_for_dense_power_of_two_factors():
    # down_proj's 1536 inputs = 32 x 48: fixed rotations store the 32-wide factor as 32 int8
    # signs, trained ones as a 32 x 32 fp16 matrix; 576 = 24 x 24 is dense either way.
    down, q = "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"
    for key, shape, extra in ((down, (576, 1536), 2 * 32 * 32 - 32), (q, (576, 576), 0)):
        fixed, _, rule = liftq_storage_bits({key: "LQ-24/10"}, {f"{key}.weight": shape})
        dense, _, dense_rule = liftq_storage_bits({key: "LQ-24/10"}, {f"{key}.weight": shape}, True)
        assert dense - fixed == 8 * extra
        assert "trained" in dense_rule and "trained" not in rule


@pytest.mark.parametrize(("cfg", "nominal"), [("LQ-20/10", 2.0), ("LQ-24/10", 2.4), ("30/10", 3.0)])
def test_liftq_bits_sit_just_above_nominal(cfg, nominal):
    bits, weights, _ = liftq_storage_bits(configs(cfg), shapes())
    assert nominal < bits / weights < nominal + 0.25


def test_liftq_bits_refuse_a_partial_output():
    partial = configs("LQ-24/10")
    partial.pop("model.layers.1.mlp.down_proj")
    with pytest.raises(AssertionError, match="down_proj"):
        liftq_storage_bits(partial, shapes())


def test_calibration_check(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("the shared calibration text")
    copy = tmp_path / "copy.txt"
    copy.write_text(calib.read_text())
    info = {"calibration": {"source": str(calib), "nsamples": 64, "seqlen": 512, "seed": 0}}
    assert calibration_mismatch(info, calib, 64, 512, 0) == ""
    info["calibration"]["source"] = str(copy)  # same bytes elsewhere: the same text
    assert calibration_mismatch(info, calib, 64, 512, 0) == ""
    assert "seed" in calibration_mismatch(info, calib, 64, 512, 1)
    info["calibration"]["source"] = "wiki"
    assert "'wiki'" in calibration_mismatch(info, calib, 64, 512, 0)


def spec(bits: float = 2.4) -> Namespace:
    return Namespace(id=f"liftq-{bits:.1f}", target_bits=bits)


def args(**kw) -> Namespace:
    base = dict(model="smollm2-135m", nsamples=64, seqlen=512, seed=0, child_timeout_s=60.0)
    return Namespace(**{"liftq_reuse_only": False, **base, **kw})


def write_output(out: Path, calib: Path, cfg: str = "LQ-24/10") -> None:
    out.mkdir(parents=True)
    info = {
        "lattice": cfg,
        "liftq_version": "0.test",
        "layers": configs(cfg),
        "calibration": {"source": str(calib), "nsamples": 64, "seqlen": 512, "seed": 0},
        "blocks": [{"layer": 0, "seconds": 10.0}, {"layer": 1, "seconds": 5.0}],
    }
    (out / "liftq.json").write_text(json.dumps(info))


def no_child(cmd, log, timeout):
    raise AssertionError(f"nothing should run: {cmd}")


def test_existing_folder_is_reused(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("text")
    write_output(tmp_path / "liftq-2.4", calib)
    row = Row("liftq-2.4", "liftq", "2.4 bits")
    out = prepare_liftq_row(spec(), row, tmp_path, calib, args(), no_child, shapes())
    assert out == tmp_path / "liftq-2.4"
    assert row.status == "quantized" and row.reused
    bits, weights, _ = liftq_storage_bits(configs("LQ-24/10"), shapes())
    assert row.bits_per_weight == bits / weights and row.total_bytes == bits // 8
    assert row.quant_seconds == 15.0 and row.peak_rss_mb is None  # made outside the bench


def test_folder_with_other_calibration_is_refused(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("text")
    write_output(tmp_path / "liftq-2.4", Path("wiki"))
    row = Row("liftq-2.4", "liftq", "2.4 bits")
    assert prepare_liftq_row(spec(), row, tmp_path, calib, args(), no_child, shapes()) is None
    assert row.status == "failed" and "delete the folder" in row.reason


def test_missing_folder_runs_the_cli_with_the_shared_calibration(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("text")
    seen = []

    def fake_cli(cmd, log, timeout):  # what `liftq quantize ... --out DIR` leaves behind
        seen.append(cmd)
        log.write_text('{"event": "block", "layer": 0}\n{"event": "done"}\n')
        write_output(Path(cmd[cmd.index("--out") + 1]), Path(cmd[cmd.index("--calib") + 1]))
        return 0, 42.0, 900.0

    row = Row("liftq-2.4", "liftq", "2.4 bits")
    out = prepare_liftq_row(spec(), row, tmp_path, calib, args(seed=0), fake_cli, shapes())
    cmd = seen[0]
    assert cmd[1:3] == ["quantize", "smollm2-135m"] and out == tmp_path / "liftq-2.4"
    for flag, value in [("--bits", "2.4"), ("--calib", str(calib)), ("--seed", "0")]:
        assert cmd[cmd.index(flag) + 1] == value
    assert (row.quant_seconds, row.peak_rss_mb, row.reused) == (42.0, 900.0, False)


def test_missing_folder_with_reuse_only(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("text")
    row = Row("liftq-2.0", "liftq", "2.0 bits")
    reuse = args(liftq_reuse_only=True)
    assert prepare_liftq_row(spec(2.0), row, tmp_path, calib, reuse, no_child, shapes()) is None
    assert row.status == "unavailable" and "--rows liftq-2.0" in row.reason


def measured(rid: str, method: str, bits: float, wt2: float, wiki: float) -> Row:
    row = Row(rid, method, "s", status="ok", bits_per_weight=bits)
    row.ppl = {"wikitext2": wt2, "wiki": wiki}
    return row


def test_regression_check():
    peers = [
        measured("fp", "fp", 32.0, 20.0, 18.0),  # never a rival
        measured("gptq-b2", "gptq", 2.2, 60.0, 50.0),
        measured("iq2", "llamacpp", 2.6, 30.0, 25.0),  # more bits than liftq-2.4: not a rival
        Row("hqq-b2", "hqq", "s", status="failed", reason="boom"),
    ]
    good = measured("liftq-2.4", "liftq", 2.5, 40.0, 45.0)
    failures, notes = regressions([*peers, good])
    assert failures == [] and any("ok liftq-2.4" in n and "gptq-b2" in n for n in notes)
    bad = measured("liftq-2.4", "liftq", 2.5, 40.0, 55.0)  # worse on `wiki` only
    failures, _ = regressions([*peers, bad])
    assert len(failures) == 1 and "wiki ppl 55.000" in failures[0]
    lone = measured("liftq-2.0", "liftq", 2.1, 99.0, 99.0)  # no rival at <= 2.1 bits
    failures, notes = regressions([*peers, lone])
    assert failures == [] and any("no peer at <= 2.100" in n for n in notes)
    waiting = Row("liftq-2.4", "liftq", "s", status="unavailable", reason="not yet")
    failures, notes = regressions([*peers, waiting])
    assert failures == [] and "not yet" in notes[0]


def test_markdown_states_failures():
    row = Row("gptq-b2", "gptq", "2-bit", status="failed", reason="RuntimeError: a | b")
    text = markdown([row], ["# title"])
    assert "failed: RuntimeError: a \\| b" in text and text.startswith("# title")


def test_a_mixed_row_asks_for_mixed_in_its_own_work_dir(tmp_path):
    mixed = Namespace(id="liftq-3.0-mixed", target_bits=3.0, mixed=True, finetune_steps=0)
    out = tmp_path / mixed.id
    cmd = quality_liftq.liftq_command(Path("liftq"), mixed, out, tmp_path / "c.txt", args(seed=0))
    assert "--mixed" in cmd and cmd[cmd.index("--bits") + 1] == "3.0"
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / ".liftq-3.0-mixed.work")
    plain = quality_liftq.liftq_command(Path("liftq"), spec(), out, tmp_path / "c.txt", args())
    assert "--mixed" not in plain and "--finetune-lr" not in plain
    long = Namespace(id="x", target_bits=3.0, mixed=True, finetune_steps=96, finetune_lr=2e-3)
    cmd = quality_liftq.liftq_command(
        Path("liftq"), long, out, tmp_path / "c.txt", args(tuning_txt=tmp_path / "t.txt")
    )
    assert cmd[cmd.index("--finetune-steps") + 1] == "96"
    assert cmd[cmd.index("--finetune-lr") + 1] == "0.002"
    assert "--correction-loss" not in cmd


def test_a_correction_loss_row_has_its_flag_and_its_own_block_stage(tmp_path):
    from bench.quality_specs import all_specs

    token = {s.id: s for s in all_specs()}["liftq-2.4-token"]
    out = tmp_path / token.id
    cmd = quality_liftq.liftq_command(Path("liftq"), token, out, tmp_path / "c.txt", args())
    assert cmd[cmd.index("--correction-loss") + 1] == "token"
    assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / ".liftq-2.4-token.work")


def test_the_block_stage_variant_rows_turn_on_their_flags_each_in_its_own_block_stage(tmp_path):
    from bench.quality_specs import all_specs

    specs = {s.id: s for s in all_specs()}
    watched = ("--true-sequential", "--compensate", "--whiten-rotations", "trained")
    plain = quality_liftq.liftq_command(
        Path("liftq"), specs["liftq-2.4"], tmp_path / "liftq-2.4", tmp_path / "c.txt", args()
    )
    assert [f for f in plain if f in watched] == []
    for variant, flags in (("staged", ["--true-sequential"]),
                           ("compensated", ["--true-sequential", "--compensate"]),
                           ("rotations", ["--whiten-rotations", "trained"])):  # fmt: skip
        spec = specs[f"liftq-2.4-{variant}"]
        out = tmp_path / spec.id
        cmd = quality_liftq.liftq_command(Path("liftq"), spec, out, tmp_path / "c.txt", args())
        assert [f for f in cmd if f in watched] == flags
        assert cmd[cmd.index("--work-dir") + 1] == str(tmp_path / f".liftq-2.4-{variant}.work")


def test_merge_keeps_the_earlier_rows_this_run_did_not_measure(tmp_path):
    from bench.quality import merged_rows

    earlier = {
        "protocol": {"max_tokens": 40960},
        "calibration": {"fingerprint": "abc"},
        "rows": [
            Row("fp", "fp", "fp32", "ok", ppl={"wikitext2": 24.4}).as_dict(),
            Row("liftq-3.0", "liftq", "3.0 bits", "ok", ppl={"wikitext2": 31.0}).as_dict(),
            Row("rtn-b2-g64", "rtn", "2-bit", "ok", ppl={"wikitext2": 9e5}).as_dict(),
        ],
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(earlier))
    run = Namespace(merge=path, max_tokens=40960)
    fresh = Row("liftq-3.0", "liftq", "3.0 bits", "ok", ppl={"wikitext2": 30.0})
    rows = merged_rows([fresh], run, Namespace(calib_fingerprint="abc"))
    assert [r.id for r in rows] == ["fp", "rtn-b2-g64", "liftq-3.0"]  # all_specs order
    assert rows[2] is fresh and fresh.origin == ""
    assert rows[0].origin == f"from {path}" and rows[0].ppl == {"wikitext2": 24.4}
    assert rows[0].status == "ok"  # still counted by the regression check
    with pytest.raises(SystemExit, match="another protocol or calibration"):
        merged_rows([fresh], run, Namespace(calib_fingerprint="other"))


def test_a_resumed_finetuning_run_adds_the_block_stage_time(tmp_path):
    calib = tmp_path / "windows.txt"
    calib.write_text("text")

    def fake_cli(cmd, log, timeout):  # blocks reused from the work dir: no block events
        log.write_text('{"event": "finetune", "step": 1}\n{"event": "done"}\n')
        write_output(Path(cmd[cmd.index("--out") + 1]), Path(cmd[cmd.index("--calib") + 1]))
        return 0, 100.0, 9000.0  # longer than the blocks' 15 s: still a resumed run

    row = Row("liftq-2.4-ft", "liftq", "2.4 bits + fine-tuning")
    prepare_liftq_row(spec(), row, tmp_path, calib, args(seed=0), fake_cli, shapes())
    assert (row.quant_seconds, row.child_seconds, row.peak_rss_mb) == (115.0, 100.0, 9000.0)
    assert "block stage resumed" in row.bits_rule
