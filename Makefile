# One-command setup: every target creates .venv and installs ctxseg into it first.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lab bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $(STAMP)

# Train every method on the synthetic default (about 6.5 min on a 2-core CPU, after setup) and write runs/demo/report.html.
demo: $(STAMP)
	$(PY) -m ctxseg demo --out runs/demo

# The whole test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) benchmarks/bench_synthetic.py
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_pixel_contrast.py
	$(PY) benchmarks/bench_metrics.py
	$(PY) benchmarks/bench_wsss.py
	$(PY) benchmarks/bench_umap.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/weak_crops.py
	$(PY) benchmarks/anchor_coverage.py

clean:
	rm -rf $(VENV) runs/demo .pytest_cache
