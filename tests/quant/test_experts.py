"""Mixture-of-experts decoders (quant/experts.py, io/model_weights.py, quant/expert_stats.py):
experts unfused into one linear per matrix compute what transformers' fused experts compute,
each is calibrated on the tokens routed to it, an expert calibration never reaches gets the
all-token fallback and is counted, routers stay in high precision, and several processes
give one process's codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.helpers import calibration_text
from tests.quant.test_architectures import SETTINGS, _ids, quantize_tiny
from tests.quant.test_job_digest import canonical, digest
from tests.quant.tiny_decoders import EXPERTS, save_tiny, tiny_config

from liftq_cli.io.packed import pack_quantized
from liftq_cli.io.quantized import META_FILE
from liftq_cli.quant import blocks, decoder
from liftq_cli.quant.exchange import gram_stats, linear_kinds
from liftq_cli.quant.experts import ExpertList, expert_lists, unfuse_loaded
from liftq_cli.quant.parallel import SOLO, Team
from liftq_cli.runtime.quantized import load_quantized_model

IDLE = 3  # the expert of layer 0 the router is made never to pick


def _loaded(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("model_type", sorted(EXPERTS))
def test_unfused_experts_compute_what_the_fused_ones_do(model_type):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **EXPERTS[model_type]))
    with torch.no_grad():  # fused tensors and biases away from their init
        for name, param in model.named_parameters():
            if param.ndim == 3 or name.endswith("_bias"):
                param.normal_(0, 0.2)
    ids = _ids(2, 3)
    with torch.no_grad():
        expected = model.eval()(ids).logits
        layouts = unfuse_loaded(model, model.config.hidden_size)
        got = model(ids).logits
    assert len(layouts) == 2 and all(
        isinstance(m, ExpertList) for m in expert_lists(model).values()
    )
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]  # nothing fused is left
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(EXPERTS))
def test_the_checkpoint_reads_under_the_unfused_names(tmp_path, model_type):
    folder = save_tiny(tmp_path / model_type, model_type)
    reader = decoder.checkpoint_reader(folder)
    model = _loaded(folder)  # transformers' own loading: fused, renamed
    with torch.no_grad():
        unfuse_loaded(model, model.config.hidden_size)
    expected = {n: p.detach() for n, p in model.named_parameters() if n != "lm_head.weight"}
    assert set(reader.names()) - {"lm_head.weight"} == set(expected)
    for name, tensor in expected.items():
        assert reader.shape(name) == tuple(tensor.shape), name
        assert torch.equal(reader.get(name).float(), tensor), name


def _silence_expert(folder: Path) -> None:
    """Make layer 0's router of a gpt-oss checkpoint never pick expert IDLE (bias -1e4)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.router.bias"][IDLE] = -1e4
    save_file(tensors, path, metadata={"format": "pt"})


def test_every_expert_is_counted_by_its_routed_tokens(tmp_path):
    folder = save_tiny(tmp_path / "m", "qwen3_moe")
    config, skeleton = blocks.build_skeleton(folder)
    reader = decoder.checkpoint_reader(folder)
    layers = decoder.find_layers(skeleton, config.num_hidden_layers)
    base = decoder.load_backbone(skeleton, reader, torch.device("cpu"))
    calls = decoder.layer_calls(base, layers, 24)
    hidden = decoder.embed(base, layers, _ids(4, 0), 2)
    block = layers[0]
    blocks.load_block(block, reader, "model.layers.0.")
    run = blocks.block_runner(calls[0], 2)
    routed = torch.zeros(4, dtype=torch.long)

    def count(_m, args, _out):
        normed = args[0]
        _, _, chosen = block.mlp.gate(normed.reshape(-1, normed.shape[-1]))
        routed.add_(torch.bincount(chosen.reshape(-1), minlength=4))

    handle = block.mlp.register_forward_hook(count)
    with torch.no_grad():
        stats, tokens = gram_stats(block, run, hidden, Team(SOLO, 2, 4), {})
    handle.remove()
    assert int(routed.sum()) == 4 * 24 * 2  # every token reaches top-2 experts
    for e in range(4):
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert tokens[f"mlp.experts.{e}.{part}"] == int(routed[e])
    assert tokens["self_attn.q_proj"] == 4 * 24
    gram = stats["mlp.experts.0.up_proj"][0]
    assert stats["mlp.experts.0.gate_proj"][0] is gram  # gate and up read one input


def test_an_expert_calibration_never_reaches_is_calibrated_on_all_tokens(tmp_path):
    import liftq_cli  # noqa: F401  (registers the packed format with transformers)

    folder = save_tiny(tmp_path / "m", "gpt_oss")
    _silence_expert(folder)
    work, quant, packed = tmp_path / "work", tmp_path / "quant", tmp_path / "packed"
    # routed by the full-precision attention (unstaged), so the silenced expert is the only
    # idle one (staged, the quantized attention's routing leaves this tiny model's expert 0
    # idle too: counted once, though both its stages find it)
    unstaged = replace(SETTINGS, true_sequential=False, compensate=False)
    reports = quantize_tiny(folder, work, quant, unstaged)
    assert [r.unrouted for r in reports] == [1, 0]
    layers = json.loads((quant / META_FILE).read_text())["layers"]
    experts = {n for n in layers if ".mlp.experts." in n}
    assert len(experts) == 2 * 4 * 3  # every matrix of every expert of both blocks
    with safe_open(quant / "liftq_unquantized.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
    assert "model.layers.0.mlp.router.weight" in stored  # routers stay in high precision
    assert "model.layers.0.mlp.experts.3.down_proj.bias" in stored
    assert not [n for n in stored if n.endswith(("gate_up_proj", "experts.down_proj"))]
    pack_quantized(quant, packed, embed="fp16", lm_head="fp16", dtype="float32")
    served = _loaded(packed)
    fake = load_quantized_model(quant)
    original = _loaded(folder)
    unfuse_loaded(original, original.config.hidden_size)
    idle = f"model.layers.0.mlp.experts.{IDLE}.up_proj"
    weight = fake.get_submodule(idle).weight.detach()
    reference = original.get_submodule(idle).weight
    assert bool(torch.isfinite(weight).all())  # the fallback Gram, not 0/0
    assert float((weight - reference).norm() / reference.norm()) < 0.6
    # and it serves: forced onto the idle expert, the packed model matches the fake-quant one
    for model in (served, fake):
        model.model.layers[0].mlp.router.bias.data[IDLE] = 1e4
    ids = _ids(2, 5)
    with torch.no_grad():
        expected, got = fake(ids).logits, served(ids).logits
    assert float((got - expected).norm() / expected.norm()) < 5e-3


def test_llama4_router_is_left_out_and_the_shared_expert_quantized(tmp_path):
    _, skeleton = blocks.build_skeleton(save_tiny(tmp_path / "m", "llama4_text"))
    names = set(linear_kinds(skeleton.model.layers[0]))
    assert "feed_forward.router" not in names
    assert {"feed_forward.shared_expert.gate_proj", "feed_forward.experts.3.down_proj"} <= names


@pytest.mark.slow
def test_two_processes_give_one_process_codes_for_experts(tmp_path, smollm2_folder):
    """The token counts and the fallback's choice are agreed across ranks before use."""
    folder = save_tiny(tmp_path / "m", "gpt_oss", {**EXPERTS["gpt_oss"], "vocab_size": 49152})
    _silence_expert(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    liftq = Path(sys.executable).parent / "liftq"
    args = ["--calib", str(calibration_text(tmp_path)), "--nsamples", "4", "--seqlen", "32"]
    args += ["--config", "LQ-16/8", "--whiten-steps", "1", "--correction-steps", "2"]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(liftq.parent), "CI": "1", "HOME": str(tmp_path)}
    for out, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run(
            [str(liftq), "quantize", str(folder), "--out", str(tmp_path / out), *args, *extra],
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    unrouted = [
        [b["unrouted"] for b in json.loads((tmp_path / out / "liftq.json").read_text())["blocks"]]
        for out in ("one", "two")
    ]
    assert unrouted[0] == unrouted[1] and unrouted[0][0] >= 1, unrouted  # IDLE at least
    assert digest(canonical(tmp_path / "two")) == digest(canonical(tmp_path / "one"))
