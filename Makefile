# `make demo` and `make test` each set up .venv (once, and again when pyproject.toml changes).
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# A Wide ResNet (WRN-16-4, 2.7M parameters) on scikit-learn's digits at 16x16: ~2 min on 2 cores.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/scaling train --config configs/train.py:model=wrn16_4,image_size=16,epochs=10 \
		--workdir runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/pytest -q -n 2 --durations=15
