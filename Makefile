# Two commands do all the set-up: `make search` (the main job on Fashion-MNIST) and `make test`.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# Debian's PostgreSQL server binaries (initdb, pg_ctl): the cluster tests start a throwaway server
POSTGRES := /usr/lib/postgresql
RUN ?= results/fashion-mnist-layers
RUN_PSVIT ?= results/fashion-mnist-psvit
# The embedded Fashion-MNIST: Debian's package (installed when make runs as root), or the four IDX files in any
# folder named by FASHION_MNIST_DIR (no root needed): `make search FASHION_MNIST_DIR=~/data/fashion-mnist`.
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
FASHION_MNIST_DIR ?= $(DEBIAN_DATA)
export FASHION_MNIST_DIR
IDX := $(wildcard $(FASHION_MNIST_DIR)/train-images-idx3-ubyte*)
AS_ROOT := $(filter 0,$(shell id -u))

.PHONY: setup data chromium postgresql search search-psvit test test-all lint lock

setup: data $(STAMP)

data:
ifeq ($(IDX),)
ifeq ($(AS_ROOT):$(FASHION_MNIST_DIR),0:$(DEBIAN_DATA))
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
else
	$(error Fashion-MNIST IDX files not found in $(FASHION_MNIST_DIR); as root: apt-get install dataset-fashion-mnist; \
	without root: put the four *-ubyte.gz files (github.com/zalandoresearch/fashion-mnist) in a folder and run \
	make with FASHION_MNIST_DIR=FOLDER)
endif
endif

# The dashboard test's browser, Debian's chromium: installed as root; without it that one test is skipped.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } || \
	echo "chromium is not installed (needs root: apt-get install chromium); the dashboard browser test is skipped"

# Installed with uv (from PyPI) at the tested versions of constraints.txt, the lock file (`make lock` rewrites it).
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -c constraints.txt -e '.[dev,dashboard,cluster]'
	touch $(STAMP)

lock: $(STAMP)
	{ echo "# The tested versions: \`make\` installs tokennas with these pins (uv pip install -c constraints.txt)."; \
	  echo "# Regenerate after an upgrade that passes \`make test-all\`: make lock"; \
	  $(VENV)/bin/uv pip freeze --python $(VENV)/bin/python | grep -v -e '^-e ' -e '^tokennas' -e '^uv=='; } > constraints.txt

# The main job: per-block token schedules of the shipped, converged parent (fmnist-vit) at half its MACs, 200
# schedules scored on its own weights, with ToMe's constant r beside the best (figures in the README).
search: setup
	$(VENV)/bin/tokennas search --space layers --parent fmnist-vit --flops 50% --trials 200 --seed 0 --out $(RUN)

# The PSViT demo: a search that trains its candidates, under a 30M-MAC budget on 2 CPU cores, with the uniform
# baseline and the top 2 re-ranked on 2 seeds; about 7 minutes on 2 idle cores.
search-psvit: setup
	$(VENV)/bin/tokennas search --space psvit --flops 30M --trials 8 --epochs 3 --train-subset 3000 \
		--retrain-top 2 --retrain-epochs 4 --retrain-seeds 2 --seed 0 --out $(RUN_PSVIT)

# The cluster tests' PostgreSQL server (Debian's postgresql): installed as root; without it they are skipped.
postgresql:
	@[ -d $(POSTGRES) ] || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq postgresql; } || \
	echo "postgresql is not installed (needs root: apt-get install postgresql); the PostgreSQL tests are skipped"

# The essential tests (about 20 to 25 minutes on 2 cores, the slowest listed at the end); test-all adds the slow
# end-to-end ones.
test: setup chromium postgresql
	$(VENV)/bin/pytest -q -m "not slow" --durations=25

test-all: setup chromium postgresql
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check .
