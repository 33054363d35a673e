"""Memory model: unit parsing, model breakdown, embeddings, KV cache.

The packed layout's byte formulas are tested in tests/io/test_packed_format.py.
"""

from __future__ import annotations

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.io.packed_format import words_per_row
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import from_hf_config, linears, resolve_architecture
from liftq_cli.plan.memory import (
    GIB,
    MIB,
    MemorySettings,
    kv_cache_bytes,
    linear_state_bytes,
    matrix_bytes,
    model_breakdown,
    parse_size,
    uniform,
)

LQ24_10 = LatticeConfig(24, 10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GB", 24_000_000_000),
        ("24GiB", 24 * 2**30),
        ("24000MB", 24_000_000_000),
        ("24G", 24 * 2**30),
        ("25769803776", 25_769_803_776),
        ("24 gb", 24_000_000_000),
        ("1.5TB", 1_500_000_000_000),
        ("512MiB", 512 * 2**20),
        ("512M", 512 * 2**20),
        ("0.5GiB", 2**29),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "24XB", "-1GB", "0GB", "24iB", "GB", "24 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInputError, match="--vram"):
        parse_size(text)


def test_parse_size_minimum_catches_a_forgotten_unit():
    with pytest.raises(BadInputError, match=r"only 24 bytes: add a unit, e\.g\. 24GB"):
        parse_size("24", "--vram", minimum=64 * MIB)


def test_breakdown_sums_and_weights():
    arch = resolve_architecture("llama-3-70b")
    breakdown = model_breakdown(arch, uniform(LQ24_10), MemorySettings())
    assert breakdown.total == sum(breakdown.parts.values())
    linear_params = sum(spec.params for spec in linears(arch))
    assert linear_params == 68_451_041_280
    # slices and 16-byte rows (packed format 2) cost 0.21% over the nominal 2.4 bits here
    assert abs(breakdown.parts["codes"] / (linear_params * 2.4 / 8) - 1) < 0.0025
    exact = sum(
        4 * s.count * s.out_features * words_per_row(s.in_features, LQ24_10) for s in linears(arch)
    )
    assert breakdown.parts["codes"] == exact
    assert breakdown.parts["lattice_matrices"] == 960
    assert breakdown.parts["embed"] == 0 and breakdown.host_bytes == 2 * 128256 * 8192
    assert breakdown.parts["lm_head"] == 128256 * 8192 + 2 * 128256  # int8 + fp16 row scales
    assert breakdown.parts["kv_cache"] == 671_088_640  # 80 x 2 x 1024 x 2 B x 2048 (default)


def test_kv_cache_bits_and_batch():
    arch = resolve_architecture("llama-3-8b")
    fp16 = kv_cache_bytes(arch, 4096, 1, 16)
    assert fp16 == 32 * 2 * 1024 * 2 * 4096
    assert kv_cache_bytes(arch, 4096, 2, 16) == 2 * fp16
    assert kv_cache_bytes(arch, 4096, 1, 8) == fp16 // 2 + 32 * 2 * 8 * 2 * 4096
    assert kv_cache_bytes(arch, 8192, 1, 16) == 2 * fp16


def test_moe_prices_every_expert():
    arch = resolve_architecture("qwen3-30b-a3b")
    parts = model_breakdown(arch, uniform(LQ24_10), MemorySettings()).parts
    experts = sum(
        4 * s.count * s.out_features * words_per_row(s.in_features, LQ24_10)
        for s in linears(arch)
        if s.routed
    )
    assert experts > 0.95 * parts["codes"]  # all 128 experts of every block, not the 8 active
    assert sum(s.count for s in linears(arch) if s.kind == "down_proj") == 48 * 128


def test_latent_attention_caches_the_latent():
    arch = resolve_architecture("deepseek-v3")
    assert kv_cache_bytes(arch, 2048, 1, 16) == 61 * 2048 * (512 + 64) * 2
    assert kv_cache_bytes(arch, 2048, 1, 8) == 61 * 2048 * (576 + 2 * 2)


def test_linear_attention_layers_keep_a_fixed_state_not_a_kv_cache():
    config = {
        "model_type": "qwen3_5_text",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 248320,
    }
    arch = from_hf_config(config, "qwen3.5-hybrid", "test")
    assert arch.attention_layers == 8
    assert kv_cache_bytes(arch, 4096, 1, 16) == 8 * 2 * 4 * 256 * 2 * 4096
    conv = (2 * 16 * 128 + 32 * 128) * 4
    state = 32 * 128 * 128
    assert linear_state_bytes(arch, 2) == 2 * 2 * 24 * (conv + state)
    short = model_breakdown(arch, uniform(LQ24_10), MemorySettings(ctx=1024)).parts
    long = model_breakdown(arch, uniform(LQ24_10), MemorySettings(ctx=8192)).parts
    assert short["linear_state"] == long["linear_state"] > 0
    assert (
        "linear_state"
        not in model_breakdown(
            resolve_architecture("llama-3-8b"), uniform(LQ24_10), MemorySettings()
        ).parts
    )


def test_matrix_precisions():
    assert matrix_bytes(1000, 512, "fp16") == 1_024_000
    assert matrix_bytes(1000, 512, "int8") == 512_000 + 2_000
    assert matrix_bytes(1000, 512, "int4") == 256_000 + 1000 * 4 * 2
    assert matrix_bytes(1000, 512, "host") == 0


def test_tied_embeddings_are_stored_once_at_one_precision():
    """As `liftq pack` stores them: once, under the embedding, when both parts share a
    precision; otherwise the lm_head is its own copy (and a host embedding costs no VRAM)."""
    arch = resolve_architecture("smollm2-135m")
    matrix, int8 = 2 * 49152 * 576, 49152 * 576 + 2 * 49152
    cases = {
        ("fp16", "fp16"): (matrix, 0, 0),
        ("int8", "int8"): (int8, 0, 0),
        ("host", "fp16"): (0, matrix, matrix),
        ("host", "int8"): (0, int8, matrix),
        ("int8", "fp16"): (int8, matrix, 0),
        ("fp16", "int8"): (matrix, int8, 0),
    }
    for (embed, lm_head), expected in cases.items():
        settings = MemorySettings(embed=embed, lm_head=lm_head)
        got = model_breakdown(arch, uniform(LQ24_10), settings)
        assert (got.parts["embed"], got.parts["lm_head"], got.host_bytes) == expected, embed


def test_overhead_replaces_runtime_parts():
    arch = resolve_architecture("llama-3-8b")
    parts = model_breakdown(arch, uniform(LQ24_10), MemorySettings(overhead_bytes=GIB)).parts
    assert parts["overhead"] == GIB
    assert not {"cuda_context", "workspace", "activations"} & set(parts)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kv_bits": 3}, "--kv-bits 3"),
        ({"embed": "fp8"}, "--embed 'fp8'"),
        ({"lm_head": "host"}, "--lm-head 'host'"),
        ({"ctx": 0}, "--ctx 0"),
        ({"batch": 0}, "--batch 0"),
    ],
)
def test_settings_validation(kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        MemorySettings(**kwargs)
