"""Hugging Face integration: `from_pretrained(packed_dir)` builds `LiftQuantLinear` layers.

`register()` adds the `liftquant` quantization method to transformers (a config class and an
`HfQuantizer`). When `config.json` carries `quantization_config.quant_method == "liftquant"`,
transformers then calls the quantizer before loading the weights; it swaps the listed
`nn.Linear` modules for `LiftQuantLinear` (on the meta device) and adds the `liftq_lattice`
bank, so every tensor of the packed file loads by name. `import liftq_cli` arranges the call
(see `runtime.hook`); calling `register()` directly is idempotent.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from liftq_cli.io.embedding_format import parse_embeddings
from liftq_cli.io.packed_format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    parse_quantization_config,
    trained_rotations,
)

EMBEDDING_KEYS = ("embed", "lm_head", "tied", "int4_group")


class LiftQuantConfig(QuantizationConfigMixin):
    """`quantization_config` of a packed LiftQuant model (see docs/FORMAT.md)."""

    def __init__(
        self,
        layers: dict[str, str] | None = None,
        format_version: int = FORMAT_VERSION,
        lattices: dict[str, str] | None = None,
        rotations: str = "fixed",
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = dict(layers or {})
        self.lattices = dict(lattices or {})
        self.rotations = rotations  # trained: every whitening factor stored dense
        # embed, lm_head, tied, int4_group (io/embedding_format.py); absent in older files
        self.embedding_keys = {k: kwargs[k] for k in EMBEDDING_KEYS if k in kwargs}
        self.post_init()

    def post_init(self) -> None:
        self.configs = parse_quantization_config(self.to_dict(), "quantization_config")
        self.embeddings = parse_embeddings(self.to_dict(), "quantization_config")
        self.dense_factors = trained_rotations(self.to_dict(), "quantization_config")

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "layers": dict(self.layers),
            "lattices": dict(self.lattices),
            **({"rotations": self.rotations} if self.rotations != "fixed" else {}),
            **self.embedding_keys,
        }


class LiftQuantHfQuantizer(HfQuantizer):
    """Loads pre-quantized (packed) LiftQuant checkpoints; it does not quantize on the fly."""

    requires_calibration = True
    quantization_config: LiftQuantConfig

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> None:
        from liftq_cli.quant.experts import unfuse_experts
        from liftq_cli.runtime.embeddings import replace_embeddings
        from liftq_cli.runtime.linear import replace_linears

        layers = dict(self.quantization_config.configs)
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        strip = ""
        if prefix != "." and not hasattr(model, prefix[:-1]):
            # A base model (e.g. AutoModel) has no `model.` level: names start one level down.
            layers = {k.removeprefix(prefix): cfg for k, cfg in layers.items()}
            strip = prefix
        unfuse_experts(model, model.config.get_text_config().hidden_size)  # stored per expert
        replace_embeddings(model, self.quantization_config.embeddings, "meta", strip)
        version = int(self.quantization_config.format_version)
        dense = self.quantization_config.dense_factors
        replace_linears(model, layers, device="meta", version=version, dense_factors=dense)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> None:
        from liftq_cli.runtime.embeddings import place_on_host

        place_on_host(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the `liftquant` method with transformers (idempotent)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LiftQuantConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LiftQuantHfQuantizer)
