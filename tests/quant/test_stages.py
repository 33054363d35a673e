"""Dataflow stages of a block's linears (quant/stages.py), found from the block itself."""

from __future__ import annotations

import pytest
import torch
from tests.quant.tiny_decoders import SUPPORTED, save_tiny

from liftq_cli.quant import blocks, decoder
from liftq_cli.quant.exchange import linear_kinds
from liftq_cli.quant.stages import linear_stages

SEQ = 24


def _block(tmp_path, model_type: str, layer: int = 0):
    folder = save_tiny(tmp_path / model_type, model_type)
    config, skeleton = blocks.build_skeleton(folder)
    reader = decoder.checkpoint_reader(folder)
    layers = decoder.find_layers(skeleton, config.num_hidden_layers)
    base = decoder.load_backbone(skeleton, reader, torch.device("cpu"))
    calls = decoder.layer_calls(base, layers, SEQ)
    ids = torch.randint(3, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
    hidden = decoder.embed(base, layers, ids, 1)
    block = layers[layer]
    blocks.load_block(block, reader, f"model.layers.{layer}.")
    return block.eval(), blocks.block_runner(calls[layer], 1), hidden


def _kinds(stages: list[list[str]]) -> list[set[str]]:
    return [{name.rpartition(".")[2] for name in stage} for stage in stages]


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_attention_then_mlp_in_four_stages(tmp_path, model_type):
    block, run, hidden = _block(tmp_path, model_type)
    stages = linear_stages(block, run, hidden, linear_kinds(block))
    assert _kinds(stages) == [
        {"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}
    ]  # fmt: skip


def test_fused_linears_are_one_stage_each(tmp_path):
    block, run, hidden = _block(tmp_path, "phi3")
    stages = linear_stages(block, run, hidden, linear_kinds(block))
    assert _kinds(stages) == [{"qkv_proj"}, {"o_proj"}, {"gate_up_proj"}, {"down_proj"}]


def test_every_experts_gate_and_up_share_a_stage(tmp_path):
    block, run, hidden = _block(tmp_path, "qwen3_moe")
    linears = linear_kinds(block)
    stages = linear_stages(block, run, hidden, linears)
    assert len(stages) == 4 and sorted(sum(stages, [])) == sorted(linears)
    experts = [n for n in linears if ".experts." in n]
    assert {n for n in experts if n.endswith(("gate_proj", "up_proj"))} <= set(stages[2])
    assert {n for n in experts if n.endswith("down_proj")} <= set(stages[3])


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_every_linear_once_and_each_after_what_it_reads(tmp_path, model_type):
    block, run, hidden = _block(tmp_path, model_type)
    linears = linear_kinds(block)
    stages = linear_stages(block, run, hidden, linears)
    assert sorted(sum(stages, [])) == sorted(linears)
    assert all(stages) and len(stages) >= 2  # an output projection reads what inputs made
    level = {name: k for k, stage in enumerate(stages) for name in stage}
    down = [n for n in linears if n.endswith(("down_proj", "o_proj", "out_proj"))]
    ins = [n for n in linears if n.endswith(("q_proj", "qkv_proj", "in_proj_qkvz"))]
    assert all(level[d] > level[i] for d in down for i in ins)


def test_a_linear_the_sample_never_reaches_goes_last(tmp_path):
    block, run, hidden = _block(tmp_path, "llama")
    linears = linear_kinds(block)
    extra = torch.nn.Linear(4, 4)  # in the list, never called by the block
    stages = linear_stages(block, run, hidden, {**linears, "unused": extra})
    assert stages[-1][-1] == "unused"
