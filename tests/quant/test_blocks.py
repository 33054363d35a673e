import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.quant.tiny_job import CFG, MATRIX, make_model, run_job

from liftq_cli.errors import BadInputError
from liftq_cli.io.workdir import WorkDir
from liftq_cli.quant.blocks import quantize_blocks
from liftq_cli.quantize_job import QuantizeSettings
from liftq_cli.runtime.quantized import load_quantized_model

ROOT = Path(__file__).resolve().parents[2]


def test_output_loads_and_tracks_the_fp_model(tmp_path):
    from transformers import AutoModelForCausalLM

    make_model(tmp_path / "fp", layers=2)
    run_job(tmp_path / "fp", tmp_path / "work", tmp_path / "out", layers=2)
    fp = AutoModelForCausalLM.from_pretrained(tmp_path / "fp").eval()
    quant = load_quantized_model(tmp_path / "out")
    codes = load_file(tmp_path / "out" / "liftq_codes.safetensors")
    assert codes["model.layers.0.self_attn.q_proj.codes"].shape == (32, 2)  # 64 bits, 2 words
    assert codes["model.layers.0.self_attn.q_proj.codes"].dtype == torch.int32
    assert torch.equal(codes["lattice.LQ-8/4"], MATRIX)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = fp(ids).logits, quant(ids).logits
    rel = float((a - b).pow(2).mean() / a.pow(2).mean())
    assert 0 < rel < 0.2  # 2-bit weights: close to, but not the same as, full precision
    w_fp = fp.model.layers[1].mlp.down_proj.weight
    w_q = quant.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(w_fp, w_q)


def test_resume_refuses_different_settings(tmp_path):
    make_model(tmp_path / "fp", layers=1)
    ids = torch.randint(0, 64, (4, 16))
    args = (tmp_path / "fp", lambda *_: CFG, ids, WorkDir(tmp_path / "work"), lambda _c: MATRIX)
    from tests.quant.test_encode import brute_force_encode

    quantize_blocks(*args, brute_force_encode, QuantizeSettings(whiten_steps=0), {"a": 1})
    with pytest.raises(BadInputError, match="different settings"):
        quantize_blocks(*args, brute_force_encode, QuantizeSettings(whiten_steps=1), {"a": 1})


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    layers = 4
    make_model(tmp_path / "fp", layers=layers)
    run_job(tmp_path / "fp", tmp_path / "work_a", tmp_path / "out_a", layers)
    script = [
        sys.executable,
        "-m",
        "tests.quant.tiny_job",
        str(tmp_path / "fp"),
        str(tmp_path / "work_b"),
        str(tmp_path / "out_b"),
        str(layers),
        "3",
    ]
    child = subprocess.Popen(script, cwd=ROOT)
    deadline = time.time() + 300
    while not (tmp_path / "work_b" / "block_0001.safetensors").exists():
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "out_b").exists()
    done = sorted(p.name for p in (tmp_path / "work_b").glob("block_*.safetensors"))
    assert 1 <= len(done) < layers
    subprocess.run(script[:-1] + ["0"], cwd=ROOT, check=True)
    for name in ("liftq_unquantized.safetensors", "liftq_codes.safetensors"):
        assert (tmp_path / "out_a" / name).read_bytes() == (tmp_path / "out_b" / name).read_bytes()
