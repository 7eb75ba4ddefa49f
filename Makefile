# Two commands for a fresh clone (see README.md):
#   make run    set up .venv and run the main job on the toy world
#   make test   set up .venv (with the test-only reference, transformers) and run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) eval.py

test: setup
	$(PY) -m pytest -q

.PHONY: setup run test
