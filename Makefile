# argus: `make help` lists the targets. Build output goes to build/ (ignored).
SHELL := /bin/bash
BUILD := $(CURDIR)/build
PY := $(CURDIR)/.venv/bin/python
PYTEST := $(PY) -m pytest

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: setup
setup: ## install everything (Debian packages, kernel headers, .venv, stand-ins); quick when done
	@scripts/setup.sh
	@$(MAKE) --no-print-directory -s standins

.PHONY: standins
standins: ## build the C stand-in libraries and the simulated rank into build/
	@$(MAKE) --no-print-directory -s -C cuda_probes/standins BUILD=$(BUILD)

.PHONY: demo
demo: setup ## simulate a 4-rank job with a planted straggler, attach argus, print the diagnosis
	$(CURDIR)/.venv/bin/argus demo

.PHONY: test
test: setup lint ## lint, then every test tier that can run here (unit + bpf; gpu skipped, with the reason)
	PY=$(PY) scripts/test

.PHONY: test-unit
test-unit: setup ## run the unit tier only (no root, no bcc)
	$(PYTEST) tests -q -m unit

.PHONY: test-bpf
test-bpf: setup ## run the bpf tier only (root: real probes on real processes)
	$(PYTEST) tests -q -m bpf

.PHONY: test-zoo
test-zoo: setup ## the workload zoo: real PyTorch jobs of every shape, healthy and faulty (root, ~10 min)
	ARGUS_ZOO=1 $(PYTEST) tests -q -m zoo

.PHONY: test-stress
test-stress: setup ## the bpf tier with one CPU-bound process per core beside it (a busy machine)
	scripts/with-load $(PYTEST) tests -q -m bpf

.PHONY: bench
bench: setup ## measure probe costs and tracing overhead (root; prints one table)
	$(PY) scripts/bench

.PHONY: lint
lint: setup ## ruff over the package, the tests and the Python scripts (`make test` runs it first)
	$(CURDIR)/.venv/bin/ruff check argus tests scripts

.PHONY: clean
clean: ## remove build output (keeps .venv)
	rm -rf $(BUILD)
