"""io/workdir.py: every work-dir file round-trips, codes cost one bit per code bit, old work
dirs still load, and damaged or foreign state is refused or recomputed, never trusted."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from liftq_cli.errors import BadInputError
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig

CFG = LatticeConfig(24, 10)


def linear_state(out: int = 6, inp: int = 30, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    slices = -(-inp // CFG.d)
    return {
        "codes": torch.rand(out, slices, CFG.D, generator=g) > 0.5,
        "scale": torch.rand(out, generator=g),
        "s1": torch.rand(inp, generator=g),
        "p1": torch.eye(5),
        "p2": torch.eye(6),
        "s2": torch.rand(inp, generator=g),
    }


def test_a_block_round_trips_exactly_with_codes_at_one_bit_per_bit(tmp_path):
    work = WorkDir(tmp_path)
    state = linear_state()
    work.save_block(3, {"mlp.up_proj": (CFG, state)}, {"layer": 3, "mse_after": 0.5})
    ((name, (cfg, back)),) = work.load_block(3).items()
    assert name == "mlp.up_proj" and cfg == CFG
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert work.block_report(3) == {"layer": 3, "mse_after": 0.5}
    with safe_open(work.block_file(3), framework="pt") as handle:
        codes = handle.get_slice("mlp.up_proj.codes")
        assert codes.get_dtype() == "I32"
        bits = 3 * 24  # 3 slices of 24 bits per row
        assert codes.get_shape() == [6, -(-bits // 32)]  # 72 bits -> 3 words, not 72 bytes


def test_a_liftq_01_block_with_bool_codes_still_loads(tmp_path):
    work = WorkDir(tmp_path)
    state = linear_state()
    tensors = {f"q.{k}": v for k, v in state.items()}
    tensors["q.lattice"] = torch.tensor([CFG.D, CFG.d])
    save_file(tensors, str(work.block_file(0)), metadata={"report": "{}"})
    ((_, (_, back)),) = work.load_block(0).items()
    assert back["codes"].dtype == torch.bool and torch.equal(back["codes"], state["codes"])


def test_a_job_resumes_only_with_the_same_settings(tmp_path):
    work = WorkDir(tmp_path / "w")
    key = work.open_job({"lattice": "LQ-24/10", "seed": 0})
    assert work.open_job({"lattice": "LQ-24/10", "seed": 0}) == key == work.job_fingerprint()
    with pytest.raises(BadInputError, match=r"different settings \(seed changed\)"):
        work.open_job({"lattice": "LQ-24/10", "seed": 1})


def test_streams_store_a_shared_stream_once(tmp_path):
    work = WorkDir(tmp_path)
    work.path.mkdir(exist_ok=True)
    fp = torch.randn(2, 4, 8)
    work.save_streams(5, fp, fp)  # --independent: the quantized stream is the fp one
    assert work.done() == 5
    a, b = work.load_streams()
    assert torch.equal(a, fp) and b is a
    quant = fp + 1
    work.save_streams(6, fp, quant)
    a, b = work.load_streams()
    assert torch.equal(a, fp) and torch.equal(b, quant) and work.done() == 6


def test_cached_stages_come_back_only_under_their_fingerprint(tmp_path):
    work = WorkDir(tmp_path)
    kappa = {(0, "q_proj"): 1.5, (11, "down_proj"): 0.25}
    work.save_sensitivity("abc", kappa, 3.0)
    assert work.load_sensitivity("abc") == kappa and work.load_sensitivity("xyz") is None
    tensors = {"model.norm.weight": torch.ones(4)}
    work.save_finetune("k1", tensors, {"kept": True})
    got, report = work.load_finetune("k1")
    assert torch.equal(got["model.norm.weight"], tensors["model.norm.weight"]) and report["kept"]
    assert work.load_finetune("k2") is None
    (tmp_path / "finetune.safetensors").write_bytes(b"damaged")
    assert work.load_finetune("k1") is None  # recomputed, the stage is deterministic


def test_damaged_state_is_a_one_line_error_naming_the_file(tmp_path):
    work = WorkDir(tmp_path)
    work.block_file(0).write_bytes(b"not safetensors")
    with pytest.raises(BadInputError, match="block_0000.safetensors' is unreadable"):
        work.load_block(0)
    (tmp_path / "job.json").write_text("{broken")
    with pytest.raises(BadInputError, match="job.json' is unreadable"):
        work.open_job({"a": 1})
    (tmp_path / "streams.json").write_text(json.dumps([1]))
    with pytest.raises(BadInputError, match="is not a JSON object"):
        work.done()
