# fedcycle: `make demo` runs the default simulation, `make test` the whole test suite.
# Both set up .venv (pinned dependencies) and the Fashion-MNIST data first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedcycle-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
RESULTS := $(CURDIR)/results

.PHONY: setup data demo test clean deploy-demo deploy-tools reproduce bench

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "fedcycle needs Python 3.11 ($(PYTHON) not found; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

# Fashion-MNIST, complete and offline, from Debian's package; else torchvision downloads it.
data: setup
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null; then \
		echo "fedcycle: installing Debian's dataset-fashion-mnist (Fashion-MNIST, MIT licence) with apt-get: the data the demo and tests train on, offline"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi
	$(BIN)/python -m fedcycle.local prepare-data

demo: data
	$(BIN)/python -m fedcycle.local simulate --sites 4 --run-config "results-dir='$(RESULTS)'"

# PYTEST_ARGS adds pytest options, e.g. make test PYTEST_ARGS="--durations=30 -x".
test: data deploy-tools
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf .flwr-home .pytest_cache

# The deployment topology on loopback: SuperLink (TLS, node auth), fleet-only proxy, 2 SuperNodes.
deploy-demo: data deploy-tools
	$(BIN)/python -m fedcycle.deploy demo --results-dir "$(RESULTS)/deploy-demo"

# nginx (the fleet-only proxy) and docker-compose (to validate docker-compose.yml), from Debian.
deploy-tools:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] || ! command -v docker-compose >/dev/null; then \
		echo "fedcycle: installing Debian's nginx-light and docker-compose with apt-get: nginx is the fleet-only proxy the deployment tests start and stop (not a system service), docker-compose validates docker-compose.yml"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx-light docker-compose; \
	fi

# The reproduction study (studies/$(PROFILE).yaml). The default profile writes docs/results/,
# the others results/reproduce/<profile>/. Interrupt it at will: the same command continues.
PROFILE ?= default
reproduce: data
	$(BIN)/python -m fedcycle.study studies/$(PROFILE).yaml

# Where every second of a round goes (a benchmark, not a test): results/bench/bench.{json,md}.
bench: data
	$(BIN)/python -m fedcycle.bench
