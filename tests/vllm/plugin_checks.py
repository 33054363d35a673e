"""Checks of the vLLM plugin's config that need vLLM itself: run by .venv-vllm's Python.

    .venv-vllm/bin/python tests/vllm/plugin_checks.py PACKED_DIR

(tests/vllm/test_plugin.py does this.) Prints one `ok NAME` line per check; any failure raises.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
import tempfile
from pathlib import Path


def expect_error(fragment: str, call, *args) -> None:  # type: ignore[no-untyped-def]
    try:
        call(*args)
    except ValueError as exc:
        assert fragment in str(exc), f"{fragment!r} not in {exc}"
        return
    raise AssertionError(f"no error containing {fragment!r}")


def main(packed: Path) -> None:
    plugins = {
        ep.name: ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")
    }
    assert plugins.get("liftquant") == "liftq_cli.vllm:register", plugins
    from vllm.model_executor.layers.quantization import get_quantization_config
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does at start
    cls = get_quantization_config("liftquant")
    assert cls.__name__ == "LiftQuantVllmConfig", cls
    load_general_plugins()  # idempotent
    print("ok entry point registers liftquant")

    raw = json.loads((packed / "config.json").read_text())["quantization_config"]
    config = cls.from_config(raw)
    config.maybe_update_config(str(packed))
    assert set(config.lattices) == {c.name for c in config.layers.values()}
    for name, matrix in config.lattices.items():
        cfg = next(c for c in config.layers.values() if c.name == name)
        assert len(matrix) == cfg.d and len(matrix[0]) == cfg.D
    print("ok lattice matrices read from the packed file:", ", ".join(sorted(config.lattices)))

    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    names = config.original_names("model.layers.0.self_attn.qkv_proj")
    assert names == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], names
    assert config.original_names("model.layers.0.mlp.down_proj") == ["model.layers.0.mlp.down_proj"]
    print("ok merged layer names map back to the packed linears")

    # a merged layer with one part left unquantized is refused with the names
    partial = dict(
        raw, layers={k: v for k, v in raw["layers"].items() if "layers.0.self_attn.k_proj" not in k}
    )
    half = cls.from_config(partial)
    half.lattices = config.lattices
    half.packed_modules_mapping = config.packed_modules_mapping
    expect_error(
        "k_proj is not quantized", half._linear_method, "model.layers.0.self_attn.qkv_proj"
    )
    print("ok a partly quantized merged layer is refused")

    expect_error("re-pack it with `liftq pack`", cls.from_config, dict(raw, format_version=1))
    print("ok format 1 is refused with the fix")

    from liftq_cli.io.packed_format import WEIGHTS_FILE

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json",):
            shutil.copy(packed / name, Path(tmp) / name)
        expect_error("is missing", cls.from_config(raw).maybe_update_config, tmp)
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(Path(tmp) / WEIGHTS_FILE))
        expect_error("has no tensor liftq_lattice.", cls.from_config(raw).maybe_update_config, tmp)
    print("ok a packed file without its lattice tensors is refused")

    mapper = cls.get_checkpoint_weight_mapper()
    assert mapper.map_name("liftq_lattice.D24_d10") is None
    assert (
        mapper.map_name("model.layers.0.mlp.up_proj.qweight")
        == "model.layers.0.mlp.up_proj.qweight"
    )
    print("ok the lattice tensors are dropped from the weight stream, nothing else")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
