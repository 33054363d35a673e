#!/usr/bin/env bash
# Create the peer-library environment for bench/quality.py, apart from the product's .venv so
# the product's dependencies stay lean. Idempotent: each step leaves a stamp and is skipped
# once done. A peer that fails to install or build is logged and left out; its benchmark row
# then says why, so this script itself only fails when the venv cannot be made at all.
#
#   bench/.venv-peers/               python venv (torch CPU pinned first, then the peers)
#   bench/.venv-peers/llama.cpp/     llama-cpp-python's sdist and the llama.cpp tools built
#                                    from its vendored source (llama-imatrix, llama-quantize)
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PEERS_VENV:-$ROOT/bench/.venv-peers}"
PY="${PY:-python3}"
TORCH="torch==2.13.0"
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
# One step per package, so one failure does not stop the others (sentencepiece: for
# llama.cpp's convert_hf_to_gguf.py).
PEERS=("hqq==0.2.8.post1" "gguf==0.19.0" "llmcompressor==0.14.0.1" "sentencepiece==0.2.3"
    "auto-round==0.16.1")
LOG="$VENV/setup.log"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" || { echo "error: cannot create $VENV with $PY -m venv" >&2; exit 1; }
fi
echo '*' >"$VENV/.gitignore" # the venv ignores itself (as Python 3.13's venv does)
: >>"$LOG"

step() { # step NAME COMMAND...: run once, stamp on success, log either way (NAME carries
    local name="$1" # the pinned version, so changing a pin re-runs its step)
    shift
    [ -f "$VENV/.stamp-$name" ] && return 0
    echo "peers: $name ..."
    if "$@" >>"$LOG" 2>&1; then
        touch "$VENV/.stamp-$name"
    else
        echo "peers: $name FAILED (see $LOG)" | tee -a "$LOG" >&2
    fi
}

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
step "$TORCH" "$VENV/bin/pip" install -q "$TORCH"
for spec in "${PEERS[@]}"; do
    step "$spec" "$VENV/bin/pip" install -q "$spec"
done

# llama.cpp: the quantize API alone cannot take an importance matrix (a C++ map), so the
# tools are built from the llama.cpp source that llama-cpp-python's sdist vendors. The same
# tree ships convert_hf_to_gguf.py and gguf-py.
LLAMA="$VENV/llama.cpp"
SDIST="$LLAMA/sdist/${LLAMA_CPP_PYTHON/==/-}.tar.gz"
SDIST="${SDIST/llama-cpp-python/llama_cpp_python}"
llama_built() { # a tree built from the pinned sdist (e.g. by an earlier run without stamps)
    [ -f "$SDIST" ] && [ -f "$LLAMA/src/vendor/llama.cpp/convert_hf_to_gguf.py" ] &&
        [ -x "$LLAMA/build/bin/llama-imatrix" ] && [ -x "$LLAMA/build/bin/llama-quantize" ]
}
build_llama() { # chained with && because set -e does not apply inside `if`
    llama_built && return 0
    mkdir -p "$LLAMA" && rm -rf "$LLAMA/sdist" "$LLAMA/src" &&
        "$VENV/bin/pip" download -q --no-deps --no-binary :all: "$LLAMA_CPP_PYTHON" \
            -d "$LLAMA/sdist" &&
        mkdir -p "$LLAMA/src" &&
        tar -xzf "$LLAMA"/sdist/*.tar.gz -C "$LLAMA/src" --strip-components=1 &&
        cmake -B "$LLAMA/build" -S "$LLAMA/src/vendor/llama.cpp" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
            -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON &&
        cmake --build "$LLAMA/build" --target llama-imatrix llama-quantize -j "$(nproc)"
}
if command -v cmake >/dev/null && command -v c++ >/dev/null; then
    step "$LLAMA_CPP_PYTHON" build_llama
else
    echo "peers: llama.cpp skipped: cmake and a C++ compiler are needed" | tee -a "$LOG" >&2
fi
echo "peers: ready in $VENV"
