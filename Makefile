# One command on a fresh machine: `make test` creates .venv on first use, installs the project and runs the tests.
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"` (or any
# CUDA build in the range of pyproject.toml) before `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-slow lint demo demo-random web bench clean train-demo train-demo-long tiny-data config-docs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[prep,train,dev,cluster,web]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

LINT_PATHS := echo pipelines training data_prep synthetic tests benchmarks

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

demo: $(VENV)/.installed
	$(VENV)/bin/echo-demo --out demo_out

# The live page (docs/web.md): talk with the demo model through the camera and the microphone at http://127.0.0.1:8000/.
# A CPU renders it slower than real time (frames arrive late, in sync); WEB_ARGS: the distilled student at 2 steps
# (docs/few_step.md), or e.g. --steps 2 --passes 2 for the model's own sampler.
WEB_ARGS ?= --few-step 2
web: $(VENV)/.installed
	$(VENV)/bin/echo-web --pipeline models/echo-demo $(WEB_ARGS)

# A tiny pipeline with random weights, built from its config (what the tests render), on a synthetic conversation.
demo-random: $(VENV)/.installed
	$(VENV)/bin/echo-demo --config configs/models/tiny.yaml --out demo_out/random

# The demo model's whole recipe (docs/demo_model.md): data → VAE → decoder → stage 1 → stage 2 → export to models/echo-demo.
# Resumable: rerun after an interruption and it continues; each complete stage is skipped.
# Sized for 90 minutes of a 2-core CPU from an empty cache (decoder 400 steps, stage 1 1500).
train-demo: $(VENV)/.installed
	$(PY) -m training.demo_recipe --recipe configs/train/demo_recipe.yaml

# Longer: the same recipe with stage 1 trained to 3000 steps. After `make train-demo` it resumes stage 1 from its newest
# checkpoint; stage 2 and the export start over.
DEMO_LONG := --set 'stage1.set=[train.max_train_steps=3000]'
train-demo-long: $(VENV)/.installed
	$(PY) -m training.demo_recipe --recipe configs/train/demo_recipe.yaml $(DEMO_LONG)

# The small prepared set the tiny training configs read (configs/train/tiny_*.yaml: data.root data/tiny/prepared): a
# synthetic conversation through the real echo-prep, plus the stage-2 caches. Then:
#   python -m training.train --config configs/train/tiny_stage1.yaml
tiny-data: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(PY) -m training.testing --out data/tiny

# docs/config_keys.md from the config dataclasses (tests/test_ecosystem.py checks it is current).
config-docs: $(VENV)/.installed
	$(PY) -m training.config --write-docs docs/config_keys.md

clean:
	rm -rf $(VENV) demo_out
