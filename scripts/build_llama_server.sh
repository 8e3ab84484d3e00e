#!/usr/bin/env bash
# Install llama-cpp-python[server] (llama.cpp's OpenAI-compatible server) into a venv.
#
# PyPI only ships llama-cpp-python as an sdist, and compiling llama.cpp takes many
# minutes, so the wheel is built ONCE into a cache outside the repo and every later
# run (fresh venvs included) installs it from there.
#
#   scripts/build_llama_server.sh [PYTHON]       # default: .venv/bin/python
#   LMDISTILL_WHEEL_DIR=...  cache folder         # default: ~/.cache/lmdistill/wheels
set -euo pipefail

PY="${1:-.venv/bin/python}"
VERSION="0.3.36"   # keep in sync with the `server` extra in pyproject.toml
# The folder names the build flavour, so a wheel built with other flags is never picked up.
WHEEL_DIR="${LMDISTILL_WHEEL_DIR:-$HOME/.cache/lmdistill/wheels/x86-64-v3}"
mkdir -p "$WHEEL_DIR"

if ! ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION into $WHEEL_DIR (once; takes a while)" >&2
    # Tests, examples and tools are not needed for the Python bindings; skipping
    # them roughly halves the compile. Not a native build: on a CPU that lists AMX but
    # whose VM does not grant the tile state, -march=native's AMX kernels die with SIGILL
    # on the first long prompt (seen 2026-12-06). AVX2/FMA/F16C (x86-64-v3) runs anywhere here.
    export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # --no-cache-dir: pip would otherwise reuse a wheel it built earlier from the same sdist,
    # whatever CMAKE_ARGS that build had.
    nice -n 5 "$PY" -m pip wheel --no-cache-dir --no-deps -w "$tmp" "llama-cpp-python==$VERSION"
    mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$WHEEL_DIR"/
fi

# --only-binary makes pip take the cached wheel instead of rebuilding the sdist; the forced
# reinstall replaces a copy of another build flavour that the venv may already hold.
"$PY" -m pip install -q --force-reinstall --no-deps --find-links "$WHEEL_DIR" --only-binary llama-cpp-python \
    "llama-cpp-python==$VERSION"
"$PY" -m pip install -q --find-links "$WHEEL_DIR" --only-binary llama-cpp-python \
    "llama-cpp-python[server]==$VERSION"
