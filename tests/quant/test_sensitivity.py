"""Fisher sensitivity: the hooks compute exactly the formula, summed over batches, and leave
the model as they found it."""

from __future__ import annotations

import torch
from tests.quant.tiny_job import tiny_config
from transformers import LlamaForCausalLM

from liftq_cli.quant.sensitivity import decoder_linears, fisher_sensitivity


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(2)).eval()


def direct_kappa(model, ids: torch.Tensor) -> dict:
    """kappa from retained output gradients, one batch: sum_t (g_t^2 . rms^2) ||x_t||^2."""
    seen = {}
    handles = []
    for key, module in decoder_linears(model).items():

        def hook(_m, args, out, key=key):
            out.retain_grad()
            seen[key] = (args[0].detach(), out)

        handles.append(module.register_forward_hook(hook))
    model(input_ids=ids, labels=ids).loss.backward()
    for handle in handles:
        handle.remove()
    result = {}
    for key, (x, out) in seen.items():
        rms2 = decoder_linears(model)[key].weight.detach().pow(2).mean(1)
        result[key] = float(((out.grad.pow(2) @ rms2) * x.pow(2).sum(-1)).sum())
    model.zero_grad(set_to_none=True)
    return result


def test_matches_the_formula_and_sums_over_batches():
    model = tiny_model()
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    kappa = fisher_sensitivity(model, ids, batch=2)
    expected = {k: direct_kappa(model, ids[:2])[k] + direct_kappa(model, ids[2:])[k] for k in kappa}
    assert set(kappa) == {(layer, kind) for layer in range(2) for kind in (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}  # fmt: skip
    for key, value in kappa.items():
        assert value > 0
        assert abs(value - expected[key]) <= 1e-4 * expected[key], key


def test_leaves_the_model_as_it_was():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    steps = []
    fisher_sensitivity(model, ids, batch=1, progress=lambda done, total: steps.append(done))
    assert steps == [1, 2]
    for name, p in model.named_parameters():
        assert p.grad is None and p.requires_grad, name
        assert torch.equal(p, before[name])
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
