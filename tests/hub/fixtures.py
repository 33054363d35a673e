"""Push-test fixtures (shared by tests/hub and tests/cli/test_push_cli.py): a local fake Hub
and a small synthetic packed folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.recipe import Recipe, dumps
from tests.hub.fake_hub import FakeHub

TOKEN = "hf_test_write"
READ_TOKEN = "hf_test_read"
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
KINDS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def demo_recipe() -> str:
    recipe = Recipe(
        model="HuggingFaceTB/SmolLM2-135M",
        config=LatticeConfig(24, 10),
        ctx=2048,
        vram_bytes=1_000_000_000,
        predicted_bytes=990_000_000,
    )
    return dumps(recipe)


def quantize_meta(layers: dict[str, str]) -> dict:
    """liftq.json as `liftq quantize` writes it (io/quantized.py, quant/run.py)."""
    return {
        "model": "smollm2-135m",
        "lattice": "LQ-24/10",
        "bits": 2.4,
        "calibration": {"source": "wiki", "nsamples": 64, "seqlen": 512, "seed": 0},
        "options": {"seed": 0},
        "recipe": demo_recipe(),
        "blocks": [],
        "layers": layers,
        "liftq_version": "0.1.0",
        "format_version": 1,
    }


def uniform_layers(name: str = "LQ-24/10") -> dict[str, str]:
    return {f"model.layers.{i}.{k}": name for i in range(2) for k in KINDS}


def make_packed_folder(folder: Path, layers: dict[str, str] | None = None) -> Path:
    """A folder shaped like `liftq pack` output (io/packed.py): config.json carrying
    quantization_config, liftq.json wrapping the quantize metadata, weights, tokenizer and
    an eval JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    layers = layers or uniform_layers()
    config = dict(TINY_CONFIG)
    config["quantization_config"] = {
        "quant_method": "liftquant",
        "format_version": 1,
        "layers": layers,
        "lattices": {
            name: "liftq_lattice.D{}_d{}".format(*name[3:].split("/"))
            for name in set(layers.values())
        },
        # what `liftq pack` records with the plan's defaults (io/embedding_format.py)
        "embed": "host",
        "lm_head": "int8",
        "tied": False,
        "int4_group": 128,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    meta = quantize_meta(layers)
    liftq = {
        "liftq_version": "0.1.0",
        "format_version": 1,
        "source": "/tmp/quantized",
        "unquantized_dtype": "float16",
        "quantize": {k: v for k, v in meta.items() if k != "layers"},
    }
    (folder / "liftq.json").write_text(json.dumps(liftq, indent=2, sort_keys=True))
    generator = torch.Generator().manual_seed(0)
    save_file(
        {"codes": torch.randint(0, 2**31 - 1, (256, 256), generator=generator, dtype=torch.int32)},
        str(folder / "model.safetensors"),
    )
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    (folder / "liftq_eval.json").write_text(json.dumps(eval_payload()))
    return folder


def make_quantized_folder(folder: Path) -> Path:
    """A folder shaped like `liftq quantize` output: plain config.json and liftq.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG, indent=2))
    (folder / "liftq.json").write_text(json.dumps(quantize_meta(uniform_layers("LQ-32/10"))))
    save_file({"w": torch.zeros(8, 8)}, str(folder / "model.safetensors"))
    return folder


def eval_payload() -> dict:
    return {
        "model": "out/packed",
        "ppl": {"wikitext2": 31.25},
        "ctx": 1024,
        "protocol": {
            "ctx": 1024,
            "stride": 1024,
            "windows": "non-overlapping, remainder dropped",
            "max_tokens": 40960,
            "bos": False,
            "scored_per_window": 1023,
        },
        "results": {"wikitext2": {"ppl": 31.25, "tokens_scored": 40920}},
        "kld_ref": "smollm2-135m",
        "kld": {"wikitext2": {"kl_mean": 0.1234, "top1_agreement": 0.8765, "ref_ppl": 24.4}},
        "sources": {"wikitext2": "wiki.test.raw"},
        "liftq_version": "0.1.0",
    }


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    return make_packed_folder(tmp_path / "packed")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running fake Hub; HF_ENDPOINT points at it and HF_TOKEN holds a write token."""
    import huggingface_hub.constants as constants

    with FakeHub({TOKEN: ("alice", "write"), READ_TOKEN: ("alice", "read")}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        # The login cache must not leak in from the machine running the tests.
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        # The Xet protocol (a separate storage service) is not emulated: use git-LFS.
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        server.add_repo(
            "HuggingFaceTB/SmolLM2-135M",
            {"README.md": b"---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# x\n"},
        )
        yield server
