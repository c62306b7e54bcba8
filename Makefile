# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU wheel by default. GPU users: see README ("GPU install"), or set TORCH_SPEC to the torch they want.
TORCH_SPEC ?= torch==2.13.0
# `make test-min`: the same tests on the lowest transformers, accelerate and peft that pyproject.toml accepts.
VENV_MIN := .venv-min

.PHONY: demo test test-min lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test,plot,deepspeed]"  # plot: the demo's curves.png and `internvl-tune plot`; deepspeed: the ZeRO tests
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/internvl-tune demo

test: venv
	$(BIN)/python -m pytest -q tests

$(VENV_MIN)/.installed: pyproject.toml tools/min_requirements.py
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/pip install --quiet --upgrade pip
	$(VENV_MIN)/bin/pip install --quiet $(TORCH_SPEC)
	$(PYTHON) tools/min_requirements.py > $(VENV_MIN)/min-requirements.txt
	$(VENV_MIN)/bin/pip install --quiet -r $(VENV_MIN)/min-requirements.txt
	$(VENV_MIN)/bin/pip install --quiet -e ".[test,plot]" -c $(VENV_MIN)/min-requirements.txt
	touch $@

test-min: $(VENV_MIN)/.installed
	$(VENV_MIN)/bin/pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft) '
	$(VENV_MIN)/bin/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info src/*.egg-info
