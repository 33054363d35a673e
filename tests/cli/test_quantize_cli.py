"""`liftq quantize`: bad input is a one-line error, a non-zero exit and nothing in --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.helpers import assert_one_line_error, calibration_text

from liftq_cli.lattice_config import LatticeConfig


@pytest.mark.parametrize("bits", ["5", "0.5"])
def test_bits_outside_catalog(cli, tmp_path, bits):
    result = cli("quantize", "smollm2-135m", "--bits", bits, "--out", str(tmp_path / "q"))
    assert_one_line_error(result, f"--bits {float(bits)}")
    assert not (tmp_path / "q").exists()


def test_unknown_lattice_config_fails_before_any_work(cli, tmp_path):
    result = cli("quantize", "smollm2-135m", "--config", "LQ-31/9", "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "LQ-31/9")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(cli, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    out = tmp_path / "q"
    result = cli("quantize", str(tmp_path / "gpt2"), "--bits", "2.4", "--out", str(out))
    assert_one_line_error(result, "gpt2")
    assert not out.exists()


def test_unwritable_out(cli):
    result = cli("quantize", "smollm2-135m", "--bits", "2.4", "--out", "/proc/liftq-out")
    assert_one_line_error(result, "/proc/liftq-out")


@pytest.mark.slow
def test_calibration_file_too_short(cli, tmp_path, smollm2_folder):
    text = tmp_path / "short.txt"
    text.write_text("A few words of calibration text, far fewer than asked for.\n")
    out = tmp_path / "q"
    result = cli(
        "quantize", "smollm2-135m", "--bits", "2.4", "--out", str(out), "--calib", str(text)
    )
    assert_one_line_error(result, "short.txt")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def test_exactly_one_target(cli, tmp_path):
    result = cli("quantize", "smollm2-135m", "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "exactly one of --bits, --config or --recipe")


@pytest.mark.slow
def test_a_run_logs_each_block_and_writes_an_evaluable_folder(cli, tmp_path, tiny_llama):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(out)]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    args += ["--whiten-steps", "2", "--correction-steps", "2"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("preflight: disk work dir + output ") and "host RAM" in lines[0]
    assert [x.split(":")[0] for x in lines[1:3]] == ["block 1/2", "block 2/2"]
    summary = "".join(lines[3:])  # the console may wrap the summary line
    assert "LQ-24/10" in summary and "2 blocks" in summary
    assert (out / "liftq.json").is_file() and (out / "liftq_codes.safetensors").is_file()
    evaluated = cli("eval", str(out), "--ppl", str(calibration_text(tmp_path)), "--ctx", "64")
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.slow
def test_json_is_one_event_per_block_then_the_summary(cli, tmp_path, tiny_llama):
    import json

    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--bits", "2.4", "--out", str(out), "--json"]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    args += ["--whiten-steps", "2", "--correction-steps", "2"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [e["event"] for e in events] == ["preflight", "block", "block", "done"]
    preflight = events[0]
    assert preflight["processes"] == 1 and preflight["estimate"]["blocks"] == 2
    assert {r["name"] for r in preflight["resources"]} >= {"host RAM", "disk work dir"}
    assert all(r["fits"] for r in preflight["resources"])
    assert [e["layer"] for e in events[1:3]] == [0, 1]
    assert events[-1]["config"] == "LQ-24/10" and events[-1]["layers"] == 2


def mixed_recipe(tmp_path, layers: dict) -> str:
    from liftq_cli.lattice_config import LatticeConfig
    from liftq_cli.recipe import Recipe, dump

    recipe = Recipe(
        model="tiny",
        config=LatticeConfig(24, 10),
        layers={k: {n: LatticeConfig.parse(c) for n, c in v.items()} for k, v in layers.items()},
    )
    dump(recipe, tmp_path / "recipe.yaml")
    return str(tmp_path / "recipe.yaml")


@pytest.mark.slow
def test_a_mixed_recipe_quantises_each_linear_at_its_own_config(cli, tmp_path, tiny_llama):
    import json

    out = tmp_path / "q"
    recipe = mixed_recipe(tmp_path, {1: {"down_proj": "LQ-30/10", "q_proj": "LQ-20/10"}})
    args = ["quantize", str(tiny_llama), "--recipe", recipe, "--out", str(out), "--json"]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    args += ["--whiten-steps", "0", "--correction-steps", "1"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    configs = json.loads((out / "liftq.json").read_text())["layers"]
    assert configs["model.layers.1.mlp.down_proj"] == "LQ-30/10"
    assert configs["model.layers.1.self_attn.q_proj"] == "LQ-20/10"
    assert configs["model.layers.0.mlp.down_proj"] == "LQ-24/10"
    assert sum(v != "LQ-24/10" for v in configs.values()) == 2
    # hidden 64, intermediate 128: down_proj 64x128 at 3.0, q_proj 64x64 at 2.0, rest at 2.4
    sizes = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64, "mlp": 3 * 64 * 128}
    total = 2 * sum(sizes.values())
    expected = 2.4 + (64 * 128 * (3.0 - 2.4) + 64 * 64 * (2.0 - 2.4)) / total
    assert summary["mixed"] is True and summary["bits"] == pytest.approx(expected)
    packed = cli("pack", str(out), "--out", str(tmp_path / "packed"), "--json")
    assert packed.exit_code == 0, packed.output


def test_a_mixed_recipe_for_another_model_is_refused(cli, tmp_path, tiny_llama):
    out = tmp_path / "q"
    recipe = mixed_recipe(tmp_path, {5: {"down_proj": "LQ-30/10"}})
    result = cli("quantize", str(tiny_llama), "--recipe", recipe, "--out", str(out))
    assert_one_line_error(result, "layer 5")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


@pytest.mark.slow
def test_finetuning_lands_in_both_files_and_a_rerun_reuses_every_stage(cli, tmp_path, tiny_llama):
    import json

    import torch
    from safetensors.torch import load_file

    out, work = tmp_path / "q", tmp_path / "work"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--json", "--work-dir", str(work)]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "4", "--seqlen", "32"]
    args += ["--whiten-steps", "0", "--correction-steps", "1"]
    result = cli(*args, "--out", str(out), "--finetune-steps", "3", "--finetune-lr", "0.01")
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [e["event"] for e in events] == ["preflight"] + ["block"] * 2 + ["finetune"] * 3 + [
        "done"
    ]
    report = events[-1]["finetune"]
    assert report["kept"] and report["kl_after"] < report["kl_before"]
    tuned = load_file(work / "finetune.safetensors")
    weights = load_file(out / "liftq_unquantized.safetensors")
    codes = load_file(out / "liftq_codes.safetensors")
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(weights[norm], tuned[norm]) and not torch.equal(tuned[norm], torch.ones(64))
    scale = "model.layers.0.mlp.up_proj.scale"
    assert torch.equal(codes[scale], tuned[scale])
    assert json.loads((out / "liftq.json").read_text())["finetune"]["kept"] is True
    # the same job again: blocks and fine-tuning come from the work dir, output byte-identical
    tuning = ["--finetune-steps", "3", "--finetune-lr", "0.01"]
    again = cli(*args, "--out", str(tmp_path / "q2"), *tuning)
    assert again.exit_code == 0, again.output
    assert [json.loads(x)["event"] for x in again.stdout.strip().splitlines()] == [
        "preflight",
        "done",
    ]
    for name in ("liftq_unquantized.safetensors", "liftq_codes.safetensors", "recipe.yaml"):
        assert (out / name).read_bytes() == (tmp_path / "q2" / name).read_bytes()
    # fine-tuning settings are not part of the block fingerprint: only that stage re-runs
    other = cli(*args, "--out", str(tmp_path / "q3"), "--finetune-steps", "2")
    assert other.exit_code == 0, other.output
    kinds = [json.loads(x)["event"] for x in other.stdout.strip().splitlines()]
    assert kinds == ["preflight"] + ["finetune"] * 2 + ["done"]
    packed = cli("pack", str(out), "--out", str(tmp_path / "packed"), "--json")
    assert packed.exit_code == 0, packed.output
    stored = load_file(tmp_path / "packed" / "model.safetensors")  # the tuned norm travels on
    torch.testing.assert_close(stored[norm].float(), tuned[norm], atol=1e-3, rtol=1e-3)


def test_a_finetuning_text_too_short_fails_before_any_work(cli, tmp_path, tiny_llama):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(out)]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    result = cli(*args, "--finetune-steps", "100")
    assert_one_line_error(result, "fewer than (--finetune-steps 100 x 4 + 8 held out)")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


@pytest.mark.slow
def test_mixed_spreads_the_bits_by_sensitivity_and_a_rerun_reuses_them(cli, tmp_path, tiny_llama):
    import json

    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--bits", "3.0", "--mixed", "--out", str(out), "--json"]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    args += ["--whiten-steps", "0", "--correction-steps", "1"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [e["event"] for e in events] == ["preflight", "sensitivity", "block", "block", "done"]
    info = json.loads((out / "liftq.json").read_text())
    allocation = info["allocation"]
    assert allocation["method"] == "fisher" and allocation["target_bits"] == 3.0
    assert allocation["code_bits"] <= 3.0 and allocation["predicted_vs_uniform"] < 1.0
    configs = [LatticeConfig.parse(c) for c in info["layers"].values()]
    assert len(configs) == 14 and len(set(configs)) > 1
    assert sum(allocation["configs"].values()) == 14
    assert info["mixed"] is True and info["bits"] <= 3.0 + 1e-9
    kappa = json.loads((tmp_path / ".q.work" / "sensitivity.json").read_text())["kappa"]
    assert len(kappa) == 14 and all(v > 0 for v in kappa.values())
    # the most sensitive linear per weight gets at least the bits of the least sensitive one
    sizes = {"q": 64 * 64, "k": 32 * 64, "v": 32 * 64, "o": 64 * 64}
    per_weight = {k: v / sizes.get(k.split(".")[1][0], 64 * 128) for k, v in kappa.items()}
    bits = {
        f"{name.split('.')[2]}.{name.rpartition('.')[2]}": LatticeConfig.parse(c).bits
        for name, c in info["layers"].items()
    }
    ranked = sorted(per_weight, key=per_weight.get)
    assert bits[ranked[-1]] >= bits[ranked[0]] and bits[ranked[-1]] > 3.0
    before = (out / "liftq_codes.safetensors").read_bytes()
    refused = cli(*args)  # the same --out again: a previous output is replaced only when asked
    assert refused.exit_code == 2 and "--overwrite" in refused.stdout
    again = cli(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert [json.loads(x)["event"] for x in again.stdout.strip().splitlines()] == [
        "preflight",
        "done",
    ]
    assert (out / "liftq_codes.safetensors").read_bytes() == before


def test_mixed_with_a_mixed_recipe_is_refused(cli, tmp_path, tiny_llama):
    out = tmp_path / "q"
    recipe = mixed_recipe(tmp_path, {1: {"down_proj": "LQ-30/10"}})
    result = cli("quantize", str(tiny_llama), "--recipe", recipe, "--mixed", "--out", str(out))
    assert_one_line_error(result, "--mixed")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def tiny_args(tmp_path) -> list[str]:
    return ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]


@pytest.mark.slow
def test_the_recipe_a_run_writes_reproduces_it(cli, tmp_path, tiny_llama):
    import yaml

    first = tmp_path / "q1"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(first)]
    args += [*tiny_args(tmp_path), "--seed", "3", "--whiten-steps", "1"]
    args += ["--correction-steps", "2", "--no-ldlq"]
    assert cli(*args).exit_code == 0
    recipe = first / "recipe.yaml"
    section = yaml.safe_load(recipe.read_text())["quantize"]
    assert section["seed"] == 3 and section["ldlq"] is False
    assert section["correction"]["steps"] == 2 and section["whiten_steps"] == 1
    assert section["calibration"] == {"source": str(calibration_text(tmp_path)), "nsamples": 2,
                                      "seqlen": 32}  # fmt: skip
    again = tmp_path / "q2"
    result = cli("quantize", str(tiny_llama), "--recipe", str(recipe), "--out", str(again))
    assert result.exit_code == 0, result.output
    for name in ("liftq_codes.safetensors", "liftq_unquantized.safetensors", "recipe.yaml"):
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    # a flag given beside --recipe wins, and the output's recipe says so
    third = tmp_path / "q3"
    result = cli(
        "quantize", str(tiny_llama), "--recipe", str(recipe), "--out", str(third),
        "--correction-steps", "1", "--ldlq",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    section = yaml.safe_load((third / "recipe.yaml").read_text())["quantize"]
    assert section["correction"]["steps"] == 1 and section["ldlq"] is True
    assert section["seed"] == 3  # the rest still comes from the recipe


def test_staging_settings_land_in_the_recipe_and_key_the_work_dir(cli, tmp_path, tiny_llama):
    import json

    import yaml

    work = tmp_path / "work"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--json", "--work-dir", str(work)]
    args += [*tiny_args(tmp_path), "--whiten-steps", "0", "--correction-steps", "0"]
    plain = cli(*args, "--out", str(tmp_path / "q1"))
    assert plain.exit_code == 0, plain.output
    section = yaml.safe_load((tmp_path / "q1" / "recipe.yaml").read_text())["quantize"]
    assert section["true_sequential"] is False and section["compensate"] is False
    # staging is another setting: the work dir's blocks are refused for it, in one line
    flags = ["--true-sequential", "--compensate", "--compensate-damp", "0.5"]
    refused = cli(*args, "--out", str(tmp_path / "q2"), *flags)
    assert refused.exit_code == 2 and "holds a job with different settings" in refused.stderr
    assert not (tmp_path / "q2").exists()
    args[args.index("--work-dir") + 1] = str(tmp_path / "work2")
    staged = cli(*args, "--out", str(tmp_path / "q2"), *flags)
    assert staged.exit_code == 0, staged.output
    events = [json.loads(x)["event"] for x in staged.stdout.strip().splitlines()]
    assert events.count("block") == 2
    section = yaml.safe_load((tmp_path / "q2" / "recipe.yaml").read_text())["quantize"]
    assert section["true_sequential"] is True and section["compensate"] is True
    assert section["compensate_damp"] == 0.5
    codes = "liftq_codes.safetensors"
    assert (tmp_path / "q1" / codes).read_bytes() != (tmp_path / "q2" / codes).read_bytes()


def test_effort_presets_land_in_the_recipe_and_refuse_a_recipe(cli, tmp_path, tiny_llama):
    import yaml

    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(out)]
    result = cli(*args, *tiny_args(tmp_path), "--effort", "fast", "--correction-steps", "3")
    assert result.exit_code == 0, result.output
    section = yaml.safe_load((out / "recipe.yaml").read_text())["quantize"]
    assert section["effort"] == "fast" and section["whiten_steps"] == 25  # the preset's
    assert section["correction"]["steps"] == 3  # a flag beside --effort wins
    assert section["correction"]["heldout"] == 2 and section["calibration"]["nsamples"] == 2
    again = tmp_path / "again"
    result = cli("quantize", str(tiny_llama), "--recipe", str(out / "recipe.yaml"), "--out",
                 str(again), "--effort", "best")  # fmt: skip
    assert_one_line_error(result, "--effort best with --recipe")
    assert not again.exists()
    result = cli(*args[:-1], str(tmp_path / "x"), "--effort", "max")
    assert_one_line_error(result, "--effort 'max' is unknown: pass one of fast, default, best")


def test_a_recipe_for_another_model_is_refused_naming_both(cli, tmp_path, tiny_llama):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "llama-3-70b-24gb.yaml"
    out = tmp_path / "q"
    result = cli("quantize", str(tiny_llama), "--recipe", str(recipe), "--out", str(out))
    assert_one_line_error(result, "meta-llama/Meta-Llama-3-70B", str(tiny_llama), "hidden_size")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def test_a_recipe_naming_the_same_model_differently_is_accepted(cli, tmp_path, tiny_llama):
    from liftq_cli.recipe import Recipe, dump

    dump(Recipe(model="someone/tiny", config=LatticeConfig(24, 10)), tmp_path / "r.yaml")
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--recipe", str(tmp_path / "r.yaml"), "--out", str(out)]
    result = cli(*args, *tiny_args(tmp_path), "--whiten-steps", "0", "--correction-steps", "0")
    assert result.exit_code == 0, result.output  # same last name: tiny


@pytest.mark.slow
def test_independent_blocks_quantize_and_resume(cli, tmp_path, tiny_llama):
    # regression: blocks 2+ of an --independent job saved two views of one tensor and crashed
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(out)]
    args += [*tiny_args(tmp_path), "--independent", "--whiten-steps", "0"]
    result = cli(*args, "--correction-steps", "1")
    assert result.exit_code == 0, result.output
    assert "2 blocks" in result.stdout.replace("\n", "")


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--bits", "nan", "--bits nan is not a number"),
        ("--whiten-steps", "-1", "--whiten-steps -1 is invalid"),
        ("--correction-steps", "-5", "--correction-steps -5 is invalid"),
        ("--nsamples", "0", "--nsamples 0 is invalid"),
        ("--finetune-lr", "0", "--finetune-lr 0.0 is invalid"),
        ("--correction-loss", "l1", "(--correction-loss) 'l1' is unknown: use mse or token"),
        ("--whiten-rotations", "cayley", "(--whiten-rotations) 'cayley' is unknown: use fixed"),
        ("--compensate-damp", "0", "--compensate-damp 0.0 is invalid"),
    ],
)
def test_bad_numbers_fail_before_any_work(cli, tmp_path, flag, value, fragment):
    out = tmp_path / "q"
    target = [] if flag == "--bits" else ["--bits", "2.4"]
    result = cli("quantize", "smollm2-135m", *target, flag, value, "--out", str(out))
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_previous_output_and_cleans_stale_temporaries(
    cli, tmp_path, tiny_llama
):
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--out", str(out)]
    args += [*tiny_args(tmp_path), "--whiten-steps", "0", "--correction-steps", "0"]
    assert cli(*args).exit_code == 0
    stale = tmp_path / ".q.999999999.abcd.tmp"  # a write killed long ago (no such PID)
    stale.mkdir()
    (out / "liftq.json").write_text((out / "liftq.json").read_text())  # still ours
    result = cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q")) == [".q.work"]


def test_help_texts_keep_their_brackets(cli):
    result = cli("lattice", "train", "--help", env={"COLUMNS": "200"})
    assert "[a I, H/sqrt(d)]" in result.stdout
    result = cli("quantize", "--help", env={"COLUMNS": "200"})
    assert "(default: 64)" in result.stdout and "(default: on)" in result.stdout


def test_a_gemma3_decoder_quantizes_and_evaluates_without_a_code_change(
    cli, tmp_path, smollm2_folder
):
    import shutil

    from tests.quant.tiny_decoders import SUPPORTED, save_tiny

    folder = save_tiny(
        tmp_path / "gemma3", "gemma3_text", {**SUPPORTED["gemma3_text"], "vocab_size": 49152}
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    out = tmp_path / "q"
    args = ["quantize", str(folder), "--config", "LQ-16/8", "--out", str(out)]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    result = cli(*args, "--whiten-steps", "1", "--correction-steps", "1")
    assert result.exit_code == 0, result.output
    evaluated = cli("eval", str(out), "--ppl", str(calibration_text(tmp_path)), "--ctx", "64")
    assert evaluated.exit_code == 0, evaluated.output


def test_a_mixture_of_experts_model_quantizes_evaluates_and_refuses_mixed(
    cli, tmp_path, smollm2_folder
):
    import shutil

    from tests.quant.tiny_decoders import EXPERTS, save_tiny

    fields = {**EXPERTS["qwen3_moe"], "vocab_size": 49152}
    folder = save_tiny(tmp_path / "moe", "qwen3_moe", fields)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    out = tmp_path / "q"
    args = ["quantize", str(folder), "--config", "LQ-16/8"]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    refused = cli(*args, "--out", str(tmp_path / "mixed"), "--mixed")
    assert_one_line_error(refused, "--mixed: 'qwen3_moe' has experts", "drop --mixed")
    assert not (tmp_path / "mixed").exists()
    result = cli(*args, "--out", str(out), "--whiten-steps", "1", "--correction-steps", "1")
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "liftq.json").read_text())["layers"]
    assert len([n for n in layers if ".mlp.experts." in n]) == 2 * 4 * 3
    evaluated = cli("eval", str(out), "--ppl", str(calibration_text(tmp_path)), "--ctx", "64")
    assert evaluated.exit_code == 0, evaluated.output


def test_trained_rotations_land_in_the_recipe_and_pack_as_dense_factors(cli, tmp_path, tiny_llama):
    import torch
    import yaml
    from safetensors.torch import load_file
    from tests.runtime.tiny_packed import write_text

    args = ["quantize", str(tiny_llama), "--config", "LQ-24/10", "--json", *tiny_args(tmp_path)]
    args += ["--whiten-steps", "10", "--correction-steps", "0"]
    text = write_text(tmp_path / "words.txt")
    fp16 = ("--embed", "fp16", "--lm-head", "fp16")  # the same logits as the unpacked model
    packed = {}
    for rotations in ("fixed", "trained"):
        out, dest = tmp_path / rotations, tmp_path / f"{rotations}-packed"
        result = cli(*args, "--whiten-rotations", rotations, "--out", str(out),
                     "--work-dir", str(tmp_path / f"work-{rotations}"))  # fmt: skip
        assert result.exit_code == 0, result.output
        section = yaml.safe_load((out / "recipe.yaml").read_text())["quantize"]
        assert section["whiten_rotations"] == rotations
        result = cli("pack", str(out), "--out", str(dest), *fp16, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["quantized_bytes"] == report["formula_quantized_bytes"]
        quant = json.loads((dest / "config.json").read_text())["quantization_config"]
        assert quant.get("rotations", "fixed") == rotations
        packed[rotations] = load_file(dest / "model.safetensors")
        ppl = [
            next(iter(json.loads(cli("eval", str(folder), "--ppl", str(text), "--ctx", "32",
                                     "--json").stdout)["results"].values()))["ppl"]
            for folder in (out, dest)
        ]  # fmt: skip
        assert abs(ppl[1] / ppl[0] - 1) < 1e-3, (rotations, ppl)
    # fixed: the hidden size 64 = 8 x 8 factors are signed Hadamard, stored as their signs
    assert any(k.endswith(".p1_signs") for k in packed["fixed"])
    assert not any(k.endswith((".p1", ".p2")) for k in packed["fixed"])
    # trained: every factor dense and orthogonal, and training moved them off Hadamard
    dense = {k: v.float() for k, v in packed["trained"].items() if k.endswith((".p1", ".p2"))}
    assert dense and not any(k.endswith("_signs") for k in packed["trained"])
    for name, p in dense.items():
        assert torch.allclose(p @ p.T, torch.eye(p.shape[0]), atol=5e-3), name
    moved = max(float((p.abs() - p.shape[0] ** -0.5).abs().max()) for p in dense.values())
    assert moved > 1e-2  # entries no longer all +-1/sqrt(n)
