# `make demo` and `make test` each set up .venv (once, and again when pyproject.toml changes).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,cpu,sky,slurm,wandb]'
	touch $(STAMP)

# The main job in miniature: a WRN width x depth sweep (6 trials) on scikit-learn's digits at
# 16x16, then its report (heatmap, Pareto fronts, curves): ~4 min on 2 cores.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/scaling sweep --config configs/wrn_width_depth.py:depths=10+16,widths=1+2+4 \
		--workdir runs/demo
	$(BIN)/scaling report runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/pytest -q -n 2 --durations=15
