"""Serve packed LiftQuant models in vLLM (an out-of-tree quantization plugin).

`pip install 'liftq[vllm]'` (or `make vllm-setup`, which builds `.venv-vllm` with vLLM's CPU
build) installs the `vllm.general_plugins` entry point `liftquant = liftq_cli.vllm:register`.
vLLM calls `register()` in every process it starts; it adds the `liftquant` quantization
method, so `vllm serve PACKED_DIR` (a `liftq pack` folder, whose config.json names the method)
builds LiftQuant layers:

* `config.LiftQuantVllmConfig`: reads `quantization_config` (format 2), picks a method per layer
  and carries the lattice matrices M (read from the packed file when vLLM builds the config);
* `linear.LiftQuantLinearMethod`: the linears, merged (qkv_proj, gate_up_proj: one lift per
  original linear) and sharded for tensor parallelism (`sharding`), computing through the
  `torch.ops.liftq.linear` custom op (Triton on CUDA, torch on CPU);
* `matrix.LiftQuantMatrixMethod`: an int8 or int4 embedding and lm_head.

Only `register()` imports vLLM; `sharding` is plain Python and tested without it.
"""

from __future__ import annotations

QUANT_NAME = "liftquant"


def register() -> None:
    """Register the `liftquant` quantization method with vLLM (idempotent)."""
    from liftq_cli.vllm import config  # noqa: F401  (registers on import)
