# Two commands do all the set-up: `make search` (the main job on Fashion-MNIST) and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DATA := /usr/share/datasets/fashion-mnist
# Debian's PostgreSQL server binaries (initdb, pg_ctl): the cluster tests start a throwaway server
POSTGRES := /usr/lib/postgresql
RUN ?= results/fashion-mnist-psvit

.PHONY: setup search test lint

setup: $(STAMP) $(DATA)

$(DATA):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev,cluster]'
	touch $(STAMP)

# The main job: a PSViT-space search under a 30M-MAC budget on 2 CPU cores, about 10 minutes.
search: setup
	$(VENV)/bin/tokennas search --space psvit --flops 30M --trials 12 --epochs 3 --train-subset 6000 \
		--seed 0 --out $(RUN)

$(POSTGRES):
	apt-get update -qq && apt-get install -y -qq postgresql

test: setup $(POSTGRES)
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
