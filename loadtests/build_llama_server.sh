#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (a benchmark peer) from the llama.cpp sources vendored inside the
# llama-cpp-python sdist. Nothing here is product code; the binary lives outside the repo.
#
#   loadtests/build_llama_server.sh            # build (skips every step already done)
#   LLAMA_CPP_PYTHON_VERSION=0.3.16 loadtests/build_llama_server.sh
#
# Result: ~/.cache/loom-peers/llama-server and llama-quantize (symlinks to the built binaries), llama.cpp (the source
#         tree: convert_hf_to_gguf.py, gguf-py) and llama-server.version (llama-cpp-python version + llama.cpp
#         commit, if known).
# Takes ~5 minutes on 2 cores the first time; a second run is a no-op.
set -euo pipefail

CACHE="${LOOM_PEERS_CACHE:-$HOME/.cache/loom-peers}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"
JOBS="${JOBS:-$(nproc)}"
PIP="${PIP:-}"
if [ -z "$PIP" ]; then
    HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [ -x "$HERE/.venv/bin/pip" ]; then PIP="$HERE/.venv/bin/pip"; else PIP="python3 -m pip"; fi
fi

mkdir -p "$CACHE"
if [ -x "$CACHE/llama-server" ] && [ -x "$CACHE/llama-quantize" ] && [ -z "${FORCE:-}" ]; then
    echo "llama-server already built: $CACHE/llama-server ($(cat "$CACHE/llama-server.version" 2>/dev/null || echo '?'))"
    exit 0
fi

# 1. the sdist (no wheels, no dependencies)
SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$SDIST" ]; then
    mkdir -p "$CACHE/sdist"
    SPEC="llama-cpp-python${VERSION:+==$VERSION}"
    echo "downloading $SPEC sdist ..."
    $PIP download --no-binary :all: --no-deps -d "$CACHE/sdist" "$SPEC"
    SDIST="$(ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -1)"
fi
NAME="$(basename "$SDIST" .tar.gz)"

# 2. unpack
SRC="$CACHE/src/$NAME"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    mkdir -p "$CACHE/src"
    tar -xzf "$SDIST" -C "$CACHE/src"
fi
LLAMA="$SRC/vendor/llama.cpp"

# 3. configure + build only the llama-server and llama-quantize targets
BUILD="$CACHE/build/$NAME"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    GEN=()
    command -v ninja >/dev/null && GEN=(-G Ninja)
    cmake -S "$LLAMA" -B "$BUILD" "${GEN[@]}" \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF
fi
cmake --build "$BUILD" --target llama-server llama-quantize -j "$JOBS"

for TOOL in llama-server llama-quantize; do
    BIN="$(find "$BUILD" -type f -name "$TOOL" -perm -u+x | head -1)"
    [ -n "$BIN" ] || { echo "$TOOL binary not found under $BUILD" >&2; exit 1; }
    ln -sf "$BIN" "$CACHE/$TOOL"
done
ln -sfn "$LLAMA" "$CACHE/llama.cpp"

# 4. record what was built (llama.cpp commit from the vendored tree if the sdist kept it)
COMMIT=""
for f in "$LLAMA/.git" "$LLAMA/common/build-info.cpp" "$BUILD/common/build-info.cpp"; do
    if [ -f "$f" ] && grep -q "LLAMA_COMMIT" "$f" 2>/dev/null; then
        COMMIT="$(grep -o 'LLAMA_COMMIT *= *"[^"]*"' "$f" | head -1 | sed 's/.*"\(.*\)"/\1/')"
        [ -n "$COMMIT" ] && [ "$COMMIT" != "unknown" ] && break
    fi
done
echo "$NAME llama.cpp=${COMMIT:-unknown}" > "$CACHE/llama-server.version"
echo "built $CACHE/llama-server ($(cat "$CACHE/llama-server.version"))"
