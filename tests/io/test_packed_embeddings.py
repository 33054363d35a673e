"""`liftq pack --embed/--lm-head`: the file holds the format's tensors, and every part of the
plan's memory breakdown equals the packed file's part, byte for byte, for every embed x lm_head
choice on an untied and a tied (SmolLM2-style) model."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from tests.runtime.tiny_packed import ATTN, MLP, quant_dir, tied_quant_dir

from liftq_cli.errors import BadInputError
from liftq_cli.io.embedding_format import (
    EMBED_CHOICES,
    LM_HEAD_CHOICES,
    EmbeddingLayout,
    embedding_tensors,
    parse_embeddings,
)
from liftq_cli.io.packed import pack_quantized
from liftq_cli.io.packed_format import quantization_config
from liftq_cli.io.quantized import read_quantized
from liftq_cli.plan.architectures import from_hf_config
from liftq_cli.plan.memory import MemorySettings, model_breakdown
from liftq_kernels.qlinear_ref import quantize_int4, quantize_int8

COMBOS = list(itertools.product(EMBED_CHOICES, LM_HEAD_CHOICES))
VOCAB, HIDDEN = 64, 48


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "tiny"
    return {False: quant_dir(root), True: tied_quant_dir(root)}


@pytest.fixture(scope="module")
def packs(sources, tmp_path_factory):
    """{(tied, embed, lm_head): (folder, report)}: each combination packed once."""
    root = tmp_path_factory.mktemp("embeddings")
    done = {}
    for tied, (embed, lm_head) in itertools.product((False, True), COMBOS):
        out = root / f"{'tied' if tied else 'untied'}-{embed}-{lm_head}"
        report = pack_quantized(sources[tied], out, embed=embed, lm_head=lm_head)
        done[tied, embed, lm_head] = (out, report)
    return done


def config_for(spec):
    return ATTN if spec.kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else MLP


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("embed", "lm_head"), COMBOS)
def test_every_part_of_the_plan_equals_the_packed_file(packs, sources, tied, embed, lm_head):
    out, report = packs[tied, embed, lm_head]
    arch = from_hf_config(json.loads((sources[tied] / "config.json").read_text()), "t", "t")
    assert arch.tie_embeddings is tied
    plan = model_breakdown(arch, config_for, MemorySettings(embed=embed, lm_head=lm_head))
    parts = report.parts
    for key in ("codes", "scales", "whitening", "lattice_matrices"):
        assert parts[key] == plan.parts[key], key
    # a host embedding is the same bytes, in host RAM instead of on the GPU
    assert parts["embed"] == plan.parts["embed"] + plan.host_bytes
    assert plan.host_bytes == (parts["embed"] if embed == "host" else 0)
    assert parts["lm_head"] == plan.parts["lm_head"]
    assert parts["unquantized"] == plan.parts["norms_biases"]
    assert report.embedding_formula == {"embed": parts["embed"], "lm_head": parts["lm_head"]}
    assert sum(parts.values()) == (out / "model.safetensors").stat().st_size


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(("embed", "lm_head"), COMBOS)
def test_file_holds_the_format_tensors_and_records_the_choice(packs, tied, embed, lm_head):
    out, _ = packs[tied, embed, lm_head]
    layout = EmbeddingLayout(embed, lm_head, tied=tied)
    expected = embedding_tensors(VOCAB, HIDDEN, layout)
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = {n for n in handle.keys() if n.startswith(("model.embed_tokens.", "lm_head."))}  # noqa: SIM118
        assert names == set(expected)
        for name, spec in expected.items():
            t = handle.get_slice(name)
            assert tuple(t.get_shape()) == spec.shape, name
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    stored_once = tied and embed == lm_head
    assert (q["embed"], q["lm_head"], q["tied"], q["int4_group"]) == (
        embed,
        lm_head,
        stored_once,
        128,
    )
    assert parse_embeddings(q, "config") == EmbeddingLayout(embed, lm_head, stored_once)
    # transformers ties only a plain fp16 pair itself; liftq's loader shares the rest
    plain = (embed, lm_head) == ("fp16", "fp16")
    assert config["tie_word_embeddings"] is (tied and plain)
    if tied and stored_once:
        assert not any(n.startswith("lm_head.") for n in names)  # stored once


def test_int_tensors_are_the_quantizers_output(packs, sources):
    source = read_quantized(sources[False]).unquantized()
    out, _ = packs[False, "int8", "int4"]
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        q, s = quantize_int8(source["model.embed_tokens.weight"])
        assert torch.equal(handle.get_tensor("model.embed_tokens.qweight"), q)
        assert torch.equal(handle.get_tensor("model.embed_tokens.qscale"), s)
        q, s = quantize_int4(source["lm_head.weight"], 128)
        assert torch.equal(handle.get_tensor("lm_head.qweight"), q)
        assert torch.equal(handle.get_tensor("lm_head.qscale"), s)
    # tied at two precisions: the lm_head is quantized from the embedding matrix
    out, _ = packs[True, "host", "int8"]
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        q, _ = quantize_int8(source["model.embed_tokens.weight"])
        assert torch.equal(handle.get_tensor("lm_head.qweight"), q)
        embedding = handle.get_tensor("model.embed_tokens.weight")
        assert embedding.dtype == torch.float16
        assert torch.equal(embedding, source["model.embed_tokens.weight"].half())


def test_host_and_fp16_follow_dtype(sources, tmp_path):
    report = pack_quantized(
        sources[False], tmp_path / "bf16", dtype="bfloat16", embed="host", lm_head="fp16"
    )
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16
    assert report.parts["embed"] == report.embedding_formula["embed"] == 2 * VOCAB * HIDDEN


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"embed": "fp8"}, "--embed 'fp8' is unknown: use one of fp16, int8, int4, host"),
        ({"lm_head": "host"}, "--lm-head 'host' is unknown: use one of fp16, int8, int4"),
        ({"lm_head": "int2"}, "--lm-head 'int2'"),
    ],
)
def test_bad_choices_are_refused_before_anything_is_written(sources, tmp_path, kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        pack_quantized(sources[False], tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_old_configs_mean_fp16_and_bad_entries_are_refused():
    layers = {"model.layers.0.mlp.up_proj": MLP}
    old = quantization_config(layers)
    assert "embed" not in old and parse_embeddings(old, "c") == EmbeddingLayout("fp16", "fp16")
    for key, value, fragment in [
        ("embed", "int3", "quantization_config.embed 'int3' is unknown"),
        ("lm_head", "host", "quantization_config.lm_head 'host' is unknown"),
        ("tied", "yes", "quantization_config.tied 'yes'"),
        ("int4_group", 100, "int4_group 100 must be a power of two"),
    ]:
        config = {**quantization_config(layers, EmbeddingLayout("int8", "int8").as_config())}
        config[key] = value
        with pytest.raises(BadInputError, match=fragment):
            parse_embeddings(config, "c")
    mismatched = quantization_config(layers, {"embed": "int8", "lm_head": "int4", "tied": True})
    with pytest.raises(BadInputError, match="does not fit embed 'int8', lm_head 'int4'"):
        parse_embeddings(mismatched, "c")
