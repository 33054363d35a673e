"""The model card and the folder metadata it is built from (no network)."""

import json
from dataclasses import replace

import pytest
from huggingface_hub import ModelCard

from liftq_cli.errors import BadInputError
from liftq_cli.hub.card import BaseInfo, quantization, render_card
from liftq_cli.hub.folder import BUNDLED_BASES, base_model_id, read_folder
from liftq_cli.hub.upload import describe_base
from liftq_cli.io.checkpoints import ALIASES
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import from_hf_config, linears
from liftq_cli.plan.memory import MemorySettings, kv_cache_bytes, model_breakdown, uniform
from tests.hub.fixtures import (
    KINDS,
    TINY_CONFIG,
    demo_recipe,
    make_packed_folder,
    make_quantized_folder,
    uniform_layers,
)

BASE = BaseInfo("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", None)


def test_huggingface_hub_reads_the_card_metadata(packed):
    info = read_folder(packed)
    card = ModelCard(render_card(info, BASE, "alice/demo"), ignore_metadata_errors=False)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.library_name == "liftq"
    assert card.data.pipeline_tag == "text-generation"
    assert "liftquant" in card.data.tags
    assert "# SmolLM2-135M-Instruct · LiftQuant LQ-24/10 (2.40 bits)" in card.text
    # how to use it: evaluate, load in transformers, serve in vLLM (the plugin's extra)
    assert "liftq eval alice/demo --ppl wikitext2" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("alice/demo")' in card.text
    assert "vllm serve alice/demo" in card.text and "liftq[vllm]" in card.text


def test_mixed_configs_are_weighted_by_weights(tmp_path):
    layers = uniform_layers("LQ-24/10")
    for kind in KINDS[4:]:  # the MLP of block 1 at 3.2 bits
        layers[f"model.layers.1.{kind}"] = "LQ-32/10"
    info = read_folder(make_packed_folder(tmp_path / "p", layers))
    quant = quantization(info)
    arch = from_hf_config(TINY_CONFIG, "tiny", "test")
    specs = linears(arch)
    mlp1 = sum(
        s.params
        for s in specs
        if s.layer == 1 and s.kind.endswith(("gate_proj", "up_proj", "down_proj"))
    )
    total = sum(s.params for s in specs)
    assert quant.bits == pytest.approx(2.4 + 0.8 * mlp1 / total)
    assert quant.counts == {"LQ-24/10": 11, "LQ-32/10": 3}
    card = render_card(info, BASE)
    assert "| per-linear configs | 11 × LQ-24/10, 3 × LQ-32/10 |" in card
    assert "LQ-24/10 (default)" in card


def test_vram_rows_follow_the_recipe_settings(tmp_path):
    folder = make_packed_folder(tmp_path / "p")
    info = read_folder(folder)
    arch = from_hf_config(TINY_CONFIG, "tiny", "test")
    quant = quantization(info)
    settings = MemorySettings(ctx=2048, embed="host", lm_head="int8")
    assert [row[0] for row in quant.vram] == [2048, 4096]  # up to max_position_embeddings
    for ctx, kv, total in quant.vram:
        parts = model_breakdown(arch, uniform(LatticeConfig(24, 10)), replace(settings, ctx=ctx))
        assert (kv, total) == (parts.parts["kv_cache"], parts.total)
    # An 8-bit KV cache in the recipe shrinks the KV column to the planner's 8-bit size.
    meta = json.loads((folder / "liftq.json").read_text())
    meta["quantize"]["recipe"] = demo_recipe().replace("kv_bits: 16", "kv_bits: 8")
    (folder / "liftq.json").write_text(json.dumps(meta))
    kv8 = quantization(read_folder(folder)).vram
    assert [row[1] for row in kv8] == [kv_cache_bytes(arch, ctx, 1, 8) for ctx in (2048, 4096)]
    assert all(a[1] < b[1] for a, b in zip(kv8, quant.vram, strict=True))


def test_vram_rows_price_what_the_packed_folder_stores(tmp_path):
    """The packed config's embed / lm_head win over the recipe's (`liftq pack --embed fp16`
    after a default plan); a file from before pack recorded them is fp16 / fp16."""
    folder = make_packed_folder(tmp_path / "p")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(embed="fp16", lm_head="int4")
    (folder / "config.json").write_text(json.dumps(config))
    settings = quantization(read_folder(folder)).settings
    assert (settings.embed, settings.lm_head, settings.ctx) == ("fp16", "int4", 2048)
    for key in ("embed", "lm_head", "tied", "int4_group"):
        del config["quantization_config"][key]
    (folder / "config.json").write_text(json.dumps(config))
    settings = quantization(read_folder(folder)).settings
    assert (settings.embed, settings.lm_head) == ("fp16", "fp16")


def test_a_quantize_output_is_described_as_unpacked(tmp_path):
    info = read_folder(make_quantized_folder(tmp_path / "q"))
    card = render_card(info, BASE)
    meta = ModelCard(card).data
    assert meta.library_name == "transformers"
    assert "none: de-quantised weights" in card
    assert "| bits per quantised weight (D/d) | 3.200 |" in card
    assert "| quantised checkpoint format_version | 1 |" in card
    assert "No evaluation was attached" in card


def test_an_unknown_base_gives_no_base_model_and_a_warning(tmp_path):
    folder = make_quantized_folder(tmp_path / "q")
    meta = json.loads((folder / "liftq.json").read_text())
    meta["model"] = str(tmp_path / "some-local-folder")
    meta["recipe"] = None
    (folder / "liftq.json").write_text(json.dumps(meta))
    info = read_folder(folder)
    base, warnings = describe_base(info, base_model_id(info))
    assert base.repo_id is None and "--base-model" in warnings[0]
    data = ModelCard(render_card(info, base)).data.to_dict()
    assert "base_model" not in data and "license" not in data
    assert "No recipe recorded" in render_card(info, base)


def test_listing_skips_hidden_files_and_the_folders_own_readme(packed):
    (packed / ".config.json.tmp").write_text("{}")
    (packed / ".cache").mkdir()
    (packed / ".cache" / "x").write_text("x")
    (packed / "README.md").write_text("# mine")
    (packed / "extra").mkdir()
    (packed / "extra" / "notes.txt").write_text("n")
    info = read_folder(packed)
    paths = [f.path_in_repo for f in info.files]
    assert paths == [
        "config.json",
        "extra/notes.txt",
        "liftq.json",
        "liftq_eval.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert info.own_readme is True
    assert info.total_bytes == sum((packed / p).stat().st_size for p in paths)


def test_every_model_alias_has_a_published_base():
    assert set(ALIASES) <= set(BUNDLED_BASES)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B"),
        ("/cache/hub/models--Qwen--Qwen2.5-32B/snapshots/abc", "Qwen/Qwen2.5-32B"),
    ],
)
def test_base_model_from_liftq_json(tmp_path, model, expected):
    folder = make_quantized_folder(tmp_path / "q")
    meta = json.loads((folder / "liftq.json").read_text())
    meta["model"] = model
    (folder / "liftq.json").write_text(json.dumps(meta))
    assert base_model_id(read_folder(folder)) == expected


def test_the_recipe_names_the_base_when_liftq_json_does_not(tmp_path):
    folder = make_quantized_folder(tmp_path / "q")
    meta = json.loads((folder / "liftq.json").read_text())
    meta["model"] = str(tmp_path)  # a local folder: no hub id
    (folder / "liftq.json").write_text(json.dumps(meta))
    assert base_model_id(read_folder(folder)) == "HuggingFaceTB/SmolLM2-135M"


def test_eval_json_must_come_from_liftq_eval(packed, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ppl": 3}))
    with pytest.raises(BadInputError, match="no 'ppl' and 'protocol' fields"):
        read_folder(packed, [bad])
    bad.write_text("not json")
    with pytest.raises(BadInputError, match="cannot read eval JSON"):
        read_folder(packed, [bad])


def test_several_eval_runs_each_state_their_protocol(packed, tmp_path):
    base_run = json.loads((packed / "liftq_eval.json").read_text())
    base_run.update(model="smollm2-135m", ppl={"wikitext2": 24.405}, kld_ref=None, kld=None)
    path = tmp_path / "base.json"
    path.write_text(json.dumps(base_run))
    card = render_card(read_folder(packed, [path, packed / "liftq_eval.json"]), BASE)
    assert "| `smollm2-135m` | wikitext2 | 24.405 | - | - | 40920 |" in card
    assert "| `out/packed` | wikitext2 | 31.250 | 0.1234 | 0.8765 | 40920 |" in card
    assert card.count("windows of ctx 1024 tokens") == 2


def test_stored_bits_match_the_packed_formats_own_report(tmp_path):
    from liftq_cli.io.packed_format import bits_report

    layers = uniform_layers("LQ-24/10")
    layers["model.layers.0.mlp.down_proj"] = "LQ-32/16"
    quant = quantization(read_folder(make_packed_folder(tmp_path / "p", layers)))
    arch = from_hf_config(TINY_CONFIG, "tiny", "test")
    shapes = {
        s.name: (s.out_features, s.in_features, LatticeConfig(32, 16))
        if (s.layer, s.kind) == (0, "down_proj")
        else (s.out_features, s.in_features, LatticeConfig(24, 10))
        for s in linears(arch)
    }
    assert quant.stored_bits == pytest.approx(bits_report(shapes).effective_bits, rel=1e-12)
    assert quant.stored_bits > quant.bits


def test_the_card_publishes_no_local_paths(tmp_path):
    from liftq_cli.hub.card import public_name, public_recipe
    from liftq_cli.quantize_job import CalibrationSettings, QuantizeSettings
    from liftq_cli.recipe import Recipe, dumps, loads

    assert public_name("/home/alice/models/Llama-3-8B") == "Llama-3-8B"
    assert public_name("./out/packed/") == "packed"
    assert public_name("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert public_name("smollm2-135m") == "smollm2-135m"
    settings = QuantizeSettings(calibration=CalibrationSettings("/home/alice/corpus.txt"))
    text = dumps(Recipe("/home/alice/models/Llama-3-8B", LatticeConfig(24, 10), quantize=settings))
    shown = loads(public_recipe(text, "meta-llama/Meta-Llama-3-8B"))
    assert shown.model == "meta-llama/Meta-Llama-3-8B"
    assert shown.quantize.calibration.source == "corpus.txt"
    assert "/home/alice" not in public_recipe(text, None)
    plain = dumps(Recipe("meta-llama/Meta-Llama-3-8B", LatticeConfig(24, 10)))
    assert public_recipe(plain, "meta-llama/Meta-Llama-3-8B") == plain  # verbatim when clean
