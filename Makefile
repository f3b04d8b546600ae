# The README's commands. `make demo` and `make test` set up .venv first when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(PY) -m lightning_rlhf.models.fast  # the C++ fused layers (~30 s, once; never fails: the Python twin runs)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rlhf-train

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not distributed"

bench: setup  # the roofline fractions (~20 s), then lightning-rlhf vs TRL: GRPO, RLOO, DPO, PPO side by side (~4 min); see bench/RESULTS.md
	$(PY) bench/roofline.py
	$(PY) bench/bench_trl.py

clean:
	rm -rf $(VENV) outputs multirun
