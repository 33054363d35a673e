"""`LiftQuantVllmConfig`: vLLM's view of a packed model's `quantization_config`.

vLLM builds it from config.json (`from_config`), then calls `maybe_update_config` with the
model's folder or hub id: that is where the lattice matrices M come from. They have no module
in a vLLM model, so they travel in this config (a few hundred floats per lattice config,
pickled with it to every worker) and are read once from the packed file's `liftq_lattice.*`
tensors, which the weight loader is then told to skip. `get_quant_method` gives each layer its
method: a LiftQuant linear (`linear`), an int8/int4 embedding or lm_head (`matrix`), or None
(vLLM's own unquantized method) for what the file stores in fp16.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.utils import WeightsMapper

from liftq_cli.io.embedding_format import parse_embeddings
from liftq_cli.io.packed_format import (
    FORMAT_VERSION,
    LATTICE_MODULE,
    WEIGHTS_FILE,
    lattice_key,
    parse_quantization_config,
    trained_rotations,
)
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.vllm import QUANT_NAME

MIN_CAPABILITY = 80  # the Triton kernels are built and checked for sm_80, sm_89 and sm_90


def _weights_file(model: str, revision: str | None) -> str:
    """The packed safetensors file of a local folder or a hub id (vLLM's own cache)."""
    if os.path.isdir(model):
        return os.path.join(model, WEIGHTS_FILE)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model, WEIGHTS_FILE, revision=revision)


def read_lattices(path: str, configs: set[LatticeConfig]) -> dict[str, list[list[float]]]:
    """{config name: M as nested float lists} from a packed file's `liftq_lattice.*` tensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"liftquant: '{path}' is missing: serve the folder `liftq pack` wrote")
    out = {}
    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        for cfg in sorted(configs):
            key = lattice_key(cfg)
            if key not in names:
                raise ValueError(f"liftquant: '{path}' has no tensor {key}: re-pack the model")
            out[cfg.name] = f.get_tensor(key).float().tolist()
    return out


@register_quantization_config(QUANT_NAME)
class LiftQuantVllmConfig(QuantizationConfig):
    """The `liftquant` method: packed format 2 (docs/FORMAT.md)."""

    def __init__(self, raw: dict[str, Any]):
        super().__init__()
        self.raw = dict(raw)
        self.layers = parse_quantization_config(raw, "quantization_config")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"liftquant: vLLM serves packed format {FORMAT_VERSION}, this model is format "
                f"{raw.get('format_version')}: re-pack it with `liftq pack`"
            )
        self.embeddings = parse_embeddings(raw, "quantization_config")
        self.dense_factors = trained_rotations(raw, "quantization_config")
        self.lattices: dict[str, list[list[float]]] = {}

    def __repr__(self) -> str:
        used = ", ".join(sorted({cfg.name for cfg in self.layers.values()}))
        return f"LiftQuantVllmConfig({len(self.layers)} linears, {used})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_NAME

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return MIN_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is all it needs

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LiftQuantVllmConfig:
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision=None):  # type: ignore[no-untyped-def]
        path = _weights_file(model_name, revision)
        self.lattices = read_lattices(path, set(self.layers.values()))
        if self.embeddings.shared and hf_config is not None:
            # Stored once, under the embedding: config.json says untied so that transformers
            # leaves the pair to liftq's runtime; vLLM must tie them to read the one copy.
            hf_config.tie_word_embeddings = True
            text = getattr(hf_config, "get_text_config", lambda: hf_config)()
            text.tie_word_embeddings = True

    def apply_vllm_mapper(self, hf_to_vllm_mapper: WeightsMapper) -> None:
        self.layers = hf_to_vllm_mapper.apply_dict(self.layers)

    @staticmethod
    def get_checkpoint_weight_mapper() -> WeightsMapper:
        # The lattice matrices reach the layers through this config, not the weight stream.
        skip = WeightsMapper(orig_to_new_prefix={f"{LATTICE_MODULE}.": None})
        return QuantizationConfig.get_checkpoint_weight_mapper() | skip

    def original_names(self, prefix: str) -> list[str]:
        """The checkpoint's linears behind a vLLM layer: `...qkv_proj` -> q, k and v_proj."""
        parent, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        return [f"{parent}.{part}" if parent else part for part in parts]

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            return self._linear_method(prefix)
        if isinstance(layer, ParallelLMHead):
            return self._matrix_method(self.embeddings.lm_head)
        if isinstance(layer, VocabParallelEmbedding):
            return self._matrix_method(self.embeddings.embed)
        if isinstance(layer, RoutedExperts):  # no LiftQuant fused-MoE method yet
            raise ValueError(
                f"liftquant: {prefix} holds mixture-of-experts experts, which the vLLM plugin "
                "does not serve yet: load this model with transformers (liftq eval, "
                "from_pretrained)"
            )
        return None

    def _linear_method(self, prefix: str) -> QuantizeMethodBase:
        from liftq_cli.vllm.linear import LiftQuantLinearMethod

        if prefix in self.layers:  # one linear in the file (a merged layer: stored fused,
            # as Phi-3's qkv_proj and gate_up_proj are)
            return LiftQuantLinearMethod(self, [self.layers[prefix]], prefix, fused=True)
        names = self.original_names(prefix)
        found = [self.layers.get(name) for name in names]
        if all(cfg is None for cfg in found):
            return UnquantizedLinearMethod()  # stored in fp16 (not quantized by liftq)
        if any(cfg is None for cfg in found):
            missing = [n for n, cfg in zip(names, found, strict=True) if cfg is None]
            raise ValueError(
                f"liftquant: vLLM merges {', '.join(names)} into {prefix}, but "
                f"{', '.join(missing)} is not quantized in this file: quantize every part"
            )
        if not self.lattices:
            raise ValueError("liftquant: the lattice matrices were not read (maybe_update_config)")
        return LiftQuantLinearMethod(self, [cfg for cfg in found if cfg is not None], prefix)

    def _matrix_method(self, precision: str) -> QuantizeMethodBase | None:
        if precision in ("fp16", "host"):
            return None  # a plain weight (host: vLLM keeps it on the device)
        from liftq_cli.vllm.matrix import LiftQuantMatrixMethod

        return LiftQuantMatrixMethod(precision, self.embeddings.group)
