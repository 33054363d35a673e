"""Model-level fine-tuning (quant/finetune.py) on a tiny random Llama."""

import pytest
import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix
from tests.quant.tiny_job import tiny_config
from transformers import LlamaForCausalLM

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.finetune import attach, finetune, norm_weights, token_kl, tuned_tensors
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quant.whitening import init_whitening
from liftq_cli.quantize_job import FinetuneConfig

CFG = LatticeConfig(8, 4)


def tiny_pair(seed: int = 0):
    """(teacher, student with every decoder linear quantised at 2 bits, quantised linears)."""
    torch.manual_seed(seed)
    config = tiny_config(layers=2)
    teacher = LlamaForCausalLM(config).eval()
    student = LlamaForCausalLM(config).eval()
    student.load_state_dict(teacher.state_dict())
    quantized = {}
    for name, module in student.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            n = module.in_features
            wh = init_whitening(n, torch.ones(n), 0.0, seed=len(quantized))
            quantized[name] = quantize_linear(
                module.weight.detach(), wh, CFG, tiny_matrix(8, 4), brute_force_encode
            )
    return teacher, student, quantized


def calib(n: int = 8, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))


PROBE = calib(4, seed=2)


def test_tuned_linears_start_at_the_block_stage_weights():
    _, student, quantized = tiny_pair()
    tuned = attach(student, quantized)
    assert len(tuned) == 2 * 7
    for name, module in tuned.items():
        torch.testing.assert_close(module.weight(), quantized[name].dequantize())
        assert isinstance(student.get_submodule(name), type(module))


def test_finetuning_lowers_the_kl_and_exports_what_it_trained():
    teacher, student, quantized = tiny_pair()
    tuned = attach(student, quantized)
    config = FinetuneConfig(steps=30, lr=2e-2, batch=4, eval_windows=4)
    result = finetune(student, teacher, tuned, calib(120), PROBE, config)  # fresh windows
    assert result.kept and result.kl_after < 0.9 * result.kl_before
    assert len(result.losses) == 30
    with torch.no_grad():
        assert float(token_kl(student, teacher, PROBE)) == pytest.approx(result.kl_after, rel=1e-5)
    tensors = tuned_tensors(student, tuned)
    norms = norm_weights(student).items()
    changed = [k for k, v in norms if not torch.equal(v, torch.ones_like(v))]
    assert changed and all(k in tensors for k in changed)
    for name, module in tuned.items():
        # the output stores the tuned scale, s1, s2 in place of the block stage's: the weight
        # rebuilt from them is the weight the student used
        q = quantized[name]
        tuned_state = {**q.state(), **{p: tensors[f"{name}.{p}"] for p in ("scale", "s1", "s2")}}
        rebuilt = QuantizedLinear.from_state(tuned_state, q.cfg, q.matrix)
        torch.testing.assert_close(rebuilt.dequantize(), module.weight().detach())
        assert torch.equal(rebuilt.codes, quantized[name].codes)  # codes never move
    assert any(not torch.equal(tensors[f"{n}.scale"], q.scale) for n, q in quantized.items()), (
        "no row scale was trained"
    )


def test_finetuning_is_deterministic():
    runs = []
    for _ in range(2):
        teacher, student, quantized = tiny_pair()
        tuned = attach(student, quantized)
        config = FinetuneConfig(steps=5, lr=1e-2, batch=2)
        finetune(student, teacher, tuned, calib(), PROBE, config)
        runs.append(tuned_tensors(student, tuned))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_a_run_that_raises_the_kl_is_undone():
    teacher, student, quantized = tiny_pair()
    tuned = attach(student, quantized)
    start = {k: v.clone() for k, v in tuned_tensors(student, tuned).items()}
    config = FinetuneConfig(steps=3, lr=3.0, batch=2)
    result = finetune(student, teacher, tuned, calib(), PROBE, config)
    assert not result.kept and result.kl_after == result.kl_before
    after = tuned_tensors(student, tuned)
    assert all(torch.equal(start[k], after[k]) for k in start)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"steps": -1}, "--finetune-steps -1"), ({"lr": 0.0}, "--finetune-lr 0.0")],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        FinetuneConfig(**kwargs)
