"""`liftq eval --speed`: tokens/s and peak memory of a packed model beside its reference."""

from __future__ import annotations

import json

import pytest
from tests.helpers import assert_one_line_error
from tests.runtime.tiny_packed import quant_dir

from liftq_cli.evaluate.speed import planned_gpu_bytes
from liftq_cli.io.packed import pack_quantized
from liftq_cli.plan.architectures import from_hf_config
from liftq_cli.plan.memory import MemorySettings, model_breakdown


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    quant = quant_dir(root)
    pack_quantized(quant, root / "packed")
    return root / "fp", root / "packed"


def test_speed_alone_measures_the_model_and_its_reference(cli, folders):
    fp, packed = folders
    result = cli(
        "eval", str(packed), "--speed", "--kld-ref", str(fp), "--device", "cpu",
        "--prompt", "6", "--new-tokens", "3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert "ppl" not in payload  # --speed alone measures no perplexity
    for key in ("model", "reference"):
        run = payload["speed"][key]
        assert run["device"] == "cpu" and run["dtype"] == "float32"
        assert run["prompt_tokens"] == 6 and run["new_tokens"] == 3
        assert run["prefill_tok_s"] > 0 and run["decode_tok_s"] > 0
        assert run["peak_bytes"] > 0 and run["peak_kind"] == "host peak RSS"
    assert "planned_bytes" not in payload["speed"]  # the plan comparison is a GPU figure


def test_speed_table_and_bad_values(cli, folders):
    _, packed = folders
    result = cli("eval", str(packed), "--speed", "--device", "cpu", "--prompt", "4",
                 "--new-tokens", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "decode tok/s" in result.stdout and "host peak RSS" in result.stdout
    bad = cli("eval", str(packed), "--speed", "--new-tokens", "1")
    assert_one_line_error(bad, "--new-tokens 1", "at least 2 new tokens")


def test_the_planned_bytes_are_the_plans_breakdown(folders):
    fp, packed = folders
    config = json.loads((packed / "config.json").read_text())
    planned = planned_gpu_bytes(packed, ctx=40, batch=2)
    arch = from_hf_config(config, "tiny", "tiny")
    layers = config["quantization_config"]["layers"]
    from liftq_cli.lattice_config import LatticeConfig

    def config_for(spec):
        block = (
            "self_attn" if spec.kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        )
        return LatticeConfig.parse(layers[f"model.layers.{spec.layer}.{block}.{spec.kind}"])

    quant = config["quantization_config"]
    settings = MemorySettings(ctx=40, batch=2, embed=quant["embed"], lm_head=quant["lm_head"])
    breakdown = model_breakdown(arch, config_for, settings)
    assert planned == breakdown.total - breakdown.parts["cuda_context"]
    assert planned_gpu_bytes(fp, ctx=40, batch=2) is None  # not a packed model
