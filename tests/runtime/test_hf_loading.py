"""transformers loads a packed folder into `LiftQuantLinear` layers after `import liftq_cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.runtime.tiny_packed import one_thread, quant_dir

from liftq_cli.io.packed import pack_quantized
from liftq_cli.runtime.linear import LiftQuantLinear
from liftq_cli.runtime.quantized import dequantized_state, load_quantized_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "tiny"
    quant = quant_dir(root)
    if not (root / "packed").is_dir():
        pack_quantized(quant, root / "packed", embed="fp16", lm_head="fp16")
    return quant, root / "packed"


def test_import_liftq_cli_is_enough_for_from_pretrained_and_generate(folders):
    _, packed = folders
    script = (
        "import sys, torch, liftq_cli\n"
        "assert 'transformers' not in sys.modules, 'import liftq_cli must stay light'\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(packed)!r})\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__)\n"
        "out = m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False)\n"
        "print(out.shape[1])\n"
    )
    command = [sys.executable, "-c", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LiftQuantLinear", "7"]


def test_packed_model_tracks_the_unpacked_quantized_model(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    quant, packed = folders
    fake = load_quantized_model(quant)
    model = AutoModelForCausalLM.from_pretrained(packed).eval()
    dense = dequantized_state(quant)
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, LiftQuantLinear)}
    assert len(swapped) == 14
    for name, module in swapped.items():
        ref = dense[f"{name}.weight"]
        assert float((module.dequantize() - ref).norm() / ref.norm()) < 2e-3, name
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = fake(ids).logits, model(ids).logits
    assert float((a - b).norm() / a.norm()) < 5e-3
    model.save_pretrained(tmp_path / "resaved")  # the quantizer is serializable
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, b)
