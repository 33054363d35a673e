"""Packed format layout (v2, and v1 as still read): byte formulas, tensor table,
`quantization_config` and bits report."""

from __future__ import annotations

import json

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.io.packed_format import (
    DTYPE_BYTES,
    FORMAT_VERSION,
    LINEAR_PARTS,
    TensorSpec,
    bits_report,
    code_bits,
    lattice_key,
    lattice_matrix_bytes,
    lattice_tensor,
    linear_tensors,
    packed_linear_bytes,
    parse_quantization_config,
    quantization_config,
    trained_rotations,
    whitening_factors,
    words_per_row,
)
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.whitening import kron_factors

LQ24_10 = LatticeConfig(24, 10)
LQ8_4 = LatticeConfig(8, 4)


@pytest.mark.parametrize(
    ("n", "pair"),
    [(4096, (64, 64)), (1536, (32, 48)), (11008, (86, 128)), (8192, (64, 128)), (4099, (1, 4099))],
)
def test_whitening_factors(n, pair):
    assert whitening_factors(n) == pair


def test_formula_factor_pair_is_the_quantizer_pair():
    for n in (1, 23, 30, 48, 576, 1536, 4096, 11008):
        assert whitening_factors(n) == kron_factors(n)
    attn = LatticeConfig(8, 5)
    words = -(-(-(-1536 // 5) * 8) // 32)  # 77 words: short rows are not padded
    assert packed_linear_bytes(576, 1536, attn)["codes"] == 576 * words * 4


def test_whitening_factors_refuse_an_empty_linear():
    with pytest.raises(BadInputError, match="in_features=0 must be positive"):
        whitening_factors(0)


@pytest.mark.parametrize(
    ("in_features", "cfg", "bits", "words", "padded"),
    [
        (32, LQ8_4, 64, 2, 2),  # 8 slices x 8 bits: exactly two words
        (33, LQ8_4, 72, 3, 3),  # one more column opens a 9th slice and a 3rd word
        (8, LatticeConfig(32, 8), 32, 1, 1),  # one slice fills one word
        (4096, LQ24_10, 9840, 308, 308),  # 410 slices x 24 bits = 307.5 words
        (8192, LQ24_10, 19680, 615, 616),  # the 615-word rows, now 16-byte aligned
        (2560, LQ24_10, 6144, 192, 192),  # under 256 words: no padding (it would cost > 1.2%)
        (10240, LQ24_10, 24576, 768, 768),
        (10250, LQ24_10, 24600, 769, 772),
    ],
)
def test_code_bits_and_words_round_up(in_features, cfg, bits, words, padded):
    assert code_bits(in_features, cfg) == bits
    assert words_per_row(in_features, cfg, version=1) == words
    assert words_per_row(in_features, cfg) == padded


def test_packed_linear_bytes_by_hand():
    # 4096 inputs at LQ-24/10: 410 slices x 24 bits = 9840 bits -> 308 words -> 1232 B per row.
    # 4096 = 64 x 64: both factors are powers of two, stored as 64 int8 signs each.
    assert packed_linear_bytes(4096, 4096, LQ24_10) == {
        "codes": 4096 * 1232,
        "scales": 2 * 4096,
        "whitening": 2 * 2 * 4096 + 64 + 64,
    }
    # SmolLM2 down_proj (576 x 1536) at LQ-20/8: 192 slices x 20 bits = 3840 bits = 120 words;
    # 1536 = 32 x 48: P1 as 32 signs, P2 dense fp16.
    assert packed_linear_bytes(576, 1536, LatticeConfig(20, 8)) == {
        "codes": 576 * 480,
        "scales": 1152,
        "whitening": 2 * 3072 + 32 + 2 * 48 * 48,
    }
    assert lattice_matrix_bytes(LQ24_10) == 4 * 10 * 24  # float32 M


def test_codes_cost_the_nominal_bits():
    for cfg in (LatticeConfig(16, 10), LQ24_10, LatticeConfig(32, 10), LatticeConfig(30, 14)):
        codes = packed_linear_bytes(8192, 28672, cfg)["codes"]
        assert abs(codes * 8 / (8192 * 28672) / cfg.bits - 1) < 0.002


def test_linear_tensors_names_order_shapes_and_dtypes():
    # 30 inputs at LQ-8/4: 8 slices x 8 bits = 64 bits = 2 words; 30 = 5 x 6.
    specs = linear_tensors(12, 30, LQ8_4)
    assert specs["qweight"] == TensorSpec((12, 2), "int32")
    assert [s.nbytes for s in specs.values()] == [96, 24, 60, 50, 72, 60]
    hadamard = linear_tensors(3, 32, LQ8_4)  # 32 = 4 x 8: both factors as signs
    assert list(hadamard) == ["qweight", "qscale", "s1", "p1_signs", "p2_signs", "s2"]
    assert hadamard["p1_signs"] == TensorSpec((4,), "int8")
    assert hadamard["p2_signs"] == TensorSpec((8,), "int8")
    assert set(hadamard) <= set(LINEAR_PARTS)
    specs = linear_tensors(12, 30, LQ8_4, version=1)
    assert specs == {
        "qweight": TensorSpec((12, 2), "int32"),
        "qscale": TensorSpec((12,), "float16"),
        "s1": TensorSpec((30,), "float16"),
        "p1": TensorSpec((5, 5), "float16"),
        "p2": TensorSpec((6, 6), "float16"),
        "s2": TensorSpec((30,), "float16"),
    }
    assert list(specs) == ["qweight", "qscale", "s1", "p1", "p2", "s2"]  # file order
    assert [s.nbytes for s in specs.values()] == [96, 24, 60, 50, 72, 60]
    assert set(specs) | set(hadamard) == set(LINEAR_PARTS)  # each tensor priced in one part
    assert {s.dtype for s in specs.values()} <= set(DTYPE_BYTES)


def test_trained_rotations_store_every_factor_dense_and_say_so():
    trained = linear_tensors(3, 32, LQ8_4, dense_factors=True)  # 32 = 4 x 8, no signs now
    assert list(trained) == ["qweight", "qscale", "s1", "p1", "p2", "s2"]
    assert trained["p1"] == TensorSpec((4, 4), "float16")
    assert trained["p2"] == TensorSpec((8, 8), "float16")
    fixed = packed_linear_bytes(3, 32, LQ8_4)["whitening"]
    dense = packed_linear_bytes(3, 32, LQ8_4, dense_factors=True)["whitening"]
    assert dense - fixed == 2 * (16 + 64) - (4 + 8)
    assert bits_report({"a": (3, 32, LQ8_4)}, dense_factors=True).overhead_bits[
        "whitening"
    ] == pytest.approx(8 * dense / (3 * 32))
    layers = {"model.layers.0.mlp.up_proj": LQ8_4}
    assert "rotations" not in quantization_config(layers)  # fixed files read as before
    assert not trained_rotations(quantization_config(layers), "config.json")
    config = json.loads(json.dumps(quantization_config(layers, rotations="trained")))
    assert config["rotations"] == "trained" and trained_rotations(config, "config.json")
    assert parse_quantization_config(config, "config.json") == layers


@pytest.mark.parametrize(("out", "inp"), [(12, 30), (1, 1), (7, 23), (576, 1536)])
def test_byte_parts_sum_the_tensor_table(out, inp):
    specs = linear_tensors(out, inp, LQ8_4)
    parts = packed_linear_bytes(out, inp, LQ8_4)
    assert sum(parts.values()) == sum(s.nbytes for s in specs.values())
    assert parts["codes"] == specs["qweight"].nbytes
    assert parts["scales"] == 2 * out


def test_lattice_tensor_name_and_shape():
    assert lattice_key(LQ24_10) == "liftq_lattice.D24_d10"
    assert lattice_tensor(LQ24_10) == TensorSpec((10, 24), "float32")


def test_quantization_config_round_trips_through_json_and_parse():
    layers = {
        "model.layers.1.mlp.down_proj": LatticeConfig(20, 8),
        "model.layers.0.self_attn.q_proj": LQ24_10,
        "model.layers.0.mlp.down_proj": LatticeConfig(20, 8),
    }
    config = quantization_config(layers)
    assert config == {
        "quant_method": "liftquant",
        "format_version": FORMAT_VERSION,
        "layers": {
            "model.layers.0.mlp.down_proj": "LQ-20/8",
            "model.layers.0.self_attn.q_proj": "LQ-24/10",
            "model.layers.1.mlp.down_proj": "LQ-20/8",
        },
        "lattices": {"LQ-20/8": "liftq_lattice.D20_d8", "LQ-24/10": "liftq_lattice.D24_d10"},
    }
    assert list(config["layers"]) == sorted(layers)  # stable order in config.json
    assert parse_quantization_config(json.loads(json.dumps(config)), "config.json") == layers


def _valid() -> dict:
    return quantization_config({"model.layers.0.mlp.up_proj": LQ8_4})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quant_method": None}, "quant_method is None, expected 'liftquant'"),
        ({"quant_method": "gptq"}, "quant_method is 'gptq', expected 'liftquant'"),
        ({"format_version": 3}, "packed format version 3 is not supported.*re-pack"),
        ({"format_version": "1"}, "packed format version '1' is not supported"),
        ({"format_version": None}, "packed format version None is not supported"),
        ({"layers": None}, "quantization_config.layers is missing: re-pack the model"),
        ({"layers": {}}, "quantization_config.layers is missing"),
        ({"layers": ["LQ-8/4"]}, "quantization_config.layers is missing"),
        ({"layers": {"a": "LQ-8/9"}}, "LQ-8/9 is invalid: D must exceed d .*: re-pack the model"),
        ({"layers": {"a": "int4"}}, "'int4' is not of the form LQ-D/d.*: re-pack the model"),
        ({"rotations": "learned"}, "rotations 'learned' is unknown .*fixed or trained.*re-pack"),
    ],
)
def test_bad_quantization_configs_are_bad_input(change, message):
    config = {**_valid(), **change}
    with pytest.raises(BadInputError, match=f"^where/config.json: .*{message}") as info:
        parse_quantization_config(config, "where/config.json")
    assert info.value.exit_code == 2


def test_bits_report_by_hand():
    # One 2 x 6 linear at LQ-8/4: 2 slices x 8 bits = 16 bits -> one word per row.
    report = bits_report({"a": (2, 6, LQ8_4)})
    assert report.weights == 12
    assert report.nominal_bits == 2.0
    assert report.overhead_bits == pytest.approx(
        {
            "padding": (2 * 32 - 12 * 2) / 12,  # 64 stored code bits for 24 nominal ones
            "scales": 8 * 2 * 2 / 12,
            "whitening": 8 * (2 * 2 * 6 + 2 + 2 * 3 * 3) / 12,  # 6 = 2 x 3: P1 as 2 signs
            "lattice_matrices": 8 * 4 * 4 * 8 / 12,
        }
    )
    stored = 8 + 4 + 44 + 128  # codes, scales, whitening, M (bytes)
    assert report.effective_bits == pytest.approx(8 * stored / 12)


def test_bits_report_counts_each_lattice_matrix_once():
    other = LatticeConfig(12, 4)
    shared = bits_report({"a": (2, 6, LQ8_4), "b": (4, 6, LQ8_4)})
    assert shared.overhead_bits["lattice_matrices"] * shared.weights == pytest.approx(
        8 * lattice_matrix_bytes(LQ8_4)
    )
    mixed = bits_report({"a": (2, 6, LQ8_4), "b": (4, 6, other)})
    assert mixed.nominal_bits == pytest.approx((12 * 2 + 24 * 3) / 36)
    assert mixed.overhead_bits["lattice_matrices"] * mixed.weights == pytest.approx(
        8 * (lattice_matrix_bytes(LQ8_4) + lattice_matrix_bytes(other))
    )
