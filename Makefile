# Two commands do all the set-up: `make search` (the main job on Fashion-MNIST) and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DATA := /usr/share/datasets/fashion-mnist
RUN ?= results/fashion-mnist-psvit

.PHONY: setup search test lint

setup: $(STAMP) $(DATA)

$(DATA):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# The main job: a PSViT-space search under a 30M-MAC budget on 2 CPU cores, with the uniform baseline
# and the top 2 re-ranked on 2 seeds; about 10 minutes.
search: setup
	$(VENV)/bin/tokennas search --space psvit --flops 30M --trials 10 --epochs 3 --train-subset 4000 \
		--retrain-top 2 --retrain-epochs 4 --retrain-seeds 2 --seed 0 --out $(RUN)

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
