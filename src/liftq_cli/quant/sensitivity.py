"""How much each decoder linear's quantisation error costs the loss (empirical Fisher).

For a linear y = W x, an error E changes the loss by about (1/2) sum_t (g_t^T E x_t)^2 to
second order (Gauss-Newton with the empirical Fisher), g_t = dL/dy_t at token t. The encoder
leaves an error of about mse * rms_i^2 on every element of row i (rows are encoded at unit
RMS, `quant/encode.py`), roughly independent across elements, so the expected increase is
(mse / 2) * kappa with

    kappa = sum_t (sum_i g_ti^2 rms_i^2) * ||x_t||^2,

one number per linear, measured with one forward and backward pass of the full-precision
model over calibration windows (next-token cross-entropy on the windows themselves).
`plan/allocation.py` turns these into per-linear lattice configs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LinearKey = tuple[int, str]  # (layer, kind): (3, "down_proj")


def decoder_linears(model: nn.Module) -> dict[LinearKey, nn.Linear]:
    """Every nn.Linear inside the decoder blocks of a transformers causal LM (also a model on
    the meta device), keyed (layer, kind)."""
    from liftq_cli.quant.decoder import find_layers
    from liftq_cli.quant.exchange import linear_kinds

    return {
        (layer, name.rpartition(".")[2]): module
        for layer, block in enumerate(find_layers(model, model.config.num_hidden_layers))
        for name, module in linear_kinds(block).items()
    }


def fisher_sensitivity(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict[LinearKey, float]:
    """kappa of every decoder linear (see the module docstring): {(layer, kind): float}.

    input_ids: int64 [n, seqlen] calibration windows; the loss is the mean next-token
    cross-entropy of each batch, and kappa sums over batches. The model's parameters are
    left as they were (no gradients are kept on them).
    """
    linears = decoder_linears(model)
    row_power = {k: m.weight.detach().double().pow(2).mean(1) for k, m in linears.items()}
    kappa = dict.fromkeys(linears, 0.0)
    input_power: dict[LinearKey, torch.Tensor] = {}
    handles = []
    for key, module in linears.items():

        def forward_hook(_m, args, _out, key=key):
            input_power[key] = args[0].detach().double().pow(2).sum(-1)  # [b, seq]

        def backward_hook(_m, _grad_in, grad_out, key=key):
            out_power = grad_out[0].detach().double().pow(2) @ row_power[key]  # [b, seq]
            kappa[key] += float((out_power * input_power.pop(key)).sum())

        handles.append(module.register_forward_hook(forward_hook))
        handles.append(module.register_full_backward_hook(backward_hook))
    was_training = model.training
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # Backward hooks fire only on a graph: let the embeddings carry it.
        model.get_input_embeddings().weight.requires_grad_(True)
        steps = -(-input_ids.shape[0] // batch)
        for step, start in enumerate(range(0, input_ids.shape[0], batch)):
            ids = input_ids[start : start + batch]
            model(input_ids=ids, labels=ids).loss.backward()
            if progress is not None:
                progress(step + 1, steps)
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
            p.grad = None
        model.train(was_training)
    return kappa
