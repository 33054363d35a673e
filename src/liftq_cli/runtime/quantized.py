"""Load a `liftq quantize` output folder as a dense float32 model, for evaluation.

Every quantized linear's weight is reconstructed in memory from its codes, scales and
whitening factors (`quant.reconstruct`), so the model computes exactly what the quantizer
measured; the unquantized tensors load as they are. The deployable form is the packed folder
(`liftq pack`, loaded by transformers through runtime/hf.py); this dense form is for
`liftq eval` and for comparing the two.
"""

from __future__ import annotations

from pathlib import Path

import torch

from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import LoadedModel, load_tokenizer, quiet_transformers, resolve
from liftq_cli.io.quantized import read_quantized
from liftq_cli.quant.experts import unfuse_experts
from liftq_cli.quant.reconstruct import QuantizedLinear


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model, the quantized linears' weights reconstructed (float32)."""
    quantized = read_quantized(folder)
    state = {name: t.float() for name, t in quantized.unquantized().items()}
    matrices = quantized.matrices()
    for name, cfg in quantized.layers.items():
        linear = QuantizedLinear.from_state(quantized.linear_state(name), cfg, matrices[cfg.name])
        state[f"{name}.weight"] = linear.dequantize()
    return state


def load_quantized_model(folder: Path) -> torch.nn.Module:
    """The causal LM in `folder` (a `liftq quantize` output), float32, CPU, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    state = dequantized_state(folder)
    with quiet_transformers():
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    unfuse_experts(model, config.hidden_size)  # one linear per expert matrix, as stored
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        name = sorted(unexpected or set(missing) - tied)[0]
        what = "has an unknown tensor" if unexpected else "lacks"
        raise BadInputError(
            f"quantized folder '{folder}' {what} '{name}' for its config.json: re-run "
            f"`liftq quantize`"
        )
    model.tie_weights()
    return model.eval()


def load_quantized(folder: Path) -> LoadedModel:
    """The model and tokenizer of a `liftq quantize` output, ready for evaluation."""
    folder = Path(folder)
    model = load_quantized_model(folder)
    return LoadedModel(
        model=model, tokenizer=load_tokenizer(folder), folder=folder, source=resolve(str(folder))
    )
