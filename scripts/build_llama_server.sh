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
WHEEL_DIR="${LMDISTILL_WHEEL_DIR:-$HOME/.cache/lmdistill/wheels}"
mkdir -p "$WHEEL_DIR"

if ! ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION into $WHEEL_DIR (once; takes a while)" >&2
    # Tests, examples and tools are not needed for the Python bindings; skipping
    # them roughly halves the compile. A native build is fine: the cache is per machine.
    export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    nice -n 5 "$PY" -m pip wheel --no-deps -w "$tmp" "llama-cpp-python==$VERSION"
    mv "$tmp"/llama_cpp_python-"$VERSION"-*.whl "$WHEEL_DIR"/
fi

# --only-binary makes pip take the cached wheel instead of rebuilding the sdist.
"$PY" -m pip install -q --find-links "$WHEEL_DIR" --only-binary llama-cpp-python \
    "llama-cpp-python[server]==$VERSION"
