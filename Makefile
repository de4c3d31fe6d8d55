# fedcycle: `make demo` runs the default simulation, `make test` the whole test suite.
# Both set up .venv (pinned dependencies) and the Fashion-MNIST data first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedcycle-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
RESULTS := $(CURDIR)/results

.PHONY: setup data demo test test-fast clean deploy-demo deploy-tools task-tools reproduce bench privacy-study demo-tabular demo-text demo-audio

# $(call apt-install,PACKAGES,WHY): install Debian packages with apt-get, saying what and why first
# (a comma inside WHY is written $(,)).
, := ,
define apt-install
	echo "fedcycle: installing Debian's $(1) with apt-get: $(2)"; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	$$SUDO apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(1)
endef

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
		$(call apt-install,dataset-fashion-mnist,Fashion-MNIST (MIT licence)$(,) the data the demo and tests train on$(,) offline); \
	fi
	$(BIN)/fedcycle prepare-data

demo: data
	$(BIN)/fedcycle simulate --sites 4 --run-config "results-dir='$(RESULTS)'"

# PYTEST_ARGS adds pytest options, e.g. make test PYTEST_ARGS="--durations=30 -x".
test: data deploy-tools task-tools
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The unit lane: every test not marked e2e (no process, no socket; tests/conftest.py enforces it).
# Only the data: the unit tests need neither nginx and docker-compose nor the fortunes and espeak-ng.
test-fast: data
	$(BIN)/python -m pytest -q -ra -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf .flwr-home .pytest_cache

# The deployment topology on loopback: SuperLink (TLS, node auth), fleet-only proxy, 2 SuperNodes.
deploy-demo: data deploy-tools
	$(BIN)/fedcycle deploy demo --results-dir "$(RESULTS)/deploy-demo"

# nginx (the fleet-only proxy) and docker-compose (to validate docker-compose.yml), from Debian.
deploy-tools:
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] || ! command -v docker-compose >/dev/null; then \
		$(call apt-install,nginx-light docker-compose,nginx is the fleet-only proxy the deployment tests start and stop (not a system service)$(,) docker-compose validates docker-compose.yml); \
	fi

# The reproduction study (studies/$(PROFILE).yaml). The default profile writes docs/results/,
# the others results/reproduce/<profile>/. Interrupt it at will: the same command continues.
PROFILE ?= default
reproduce: data
	$(BIN)/fedcycle study studies/$(PROFILE).yaml

# Where every second of a round goes (a benchmark, not a test): results/bench/bench.{json,md}.
bench: data
	$(BIN)/fedcycle bench

# What differential privacy costs (a measurement, not a test): the tabular task and Fashion-MNIST,
# 4 sites, at epsilon 1, 3 and 8 against no DP: results/privacy/privacy.{json,md}.
privacy-study: data
	$(BIN)/python -m fedcycle_tools.privacy_study

# The built-in tasks on real data made offline (README, "Built-in tasks"): the data, then a
# short simulation of each. fedcycle_tools.demo_data prints the run config that points at the data.
DEMO_DATA := $(RESULTS)/demo-data

demo-tabular: setup
	@cfg=$$($(BIN)/fedcycle demo-data tabular $(DEMO_DATA)/tabular) && \
	$(BIN)/fedcycle simulate --sites 3 --run-config "$$cfg num-server-rounds=5 local-epochs=5 batch-size=32 results-dir='$(RESULTS)' run-name='demo-tabular'"

# The text and audio tasks' real data (README, "Built-in tasks"): fortune cookies in 5 languages
# and the espeak-ng speech synthesiser, from Debian.
task-tools:
	@[ -d /usr/share/games/fortunes/pl ] && [ -f /usr/share/games/fortunes/science ] || { $(call apt-install,fortunes fortunes-de fortunes-es fortunes-it fortunes-pl,fortune cookies in 5 languages (BSD and GPL-2+)$(,) the text task's documents in the tests and make demo-text); }
	@command -v espeak-ng >/dev/null || { $(call apt-install,espeak-ng,a speech synthesiser (GPL-3+)$(,) whose voices speak the audio task's digits in the tests and make demo-audio); }

demo-text: setup task-tools
	@cfg=$$($(BIN)/fedcycle demo-data text $(DEMO_DATA)/text) && \
	$(BIN)/fedcycle simulate --sites 4 --run-config "$$cfg partitioner='dirichlet' dirichlet.alpha=0.5 num-server-rounds=5 optimizer='adamw' lr-min=0.0005 lr-max=0.005 results-dir='$(RESULTS)' run-name='demo-text'"

demo-audio: setup task-tools
	@cfg=$$($(BIN)/fedcycle demo-data audio $(DEMO_DATA)/audio) && \
	$(BIN)/fedcycle simulate --sites 4 --run-config "$$cfg num-server-rounds=10 local-epochs=2 batch-size=32 results-dir='$(RESULTS)' run-name='demo-audio'"
