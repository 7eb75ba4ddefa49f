# Two commands for a fresh clone (see README.md):
#   make run     the method on one world (4 min 44 s on 2 idle CPU cores from a fresh clone): set up .venv,
#                build the seed-0 toy world (once, ~2 min), train targeted completion and the augment baseline
#                on it (150 steps each, ~1.5 min; reused when runs/seed-0/<row> is finished), attack base,
#                aligned, aligned decoded contrastively, augment and targeted (greedy prefilling k = 0 5 10 20
#                40, insertion, a harmful/benign fine-tuning attack of 10 steps; no sampling attack, ~1.5 min)
#                and write runs/demo.json and one report, runs/demo.html: the findings (paired tests), the
#                models side by side, the token view before (aligned) and after training (augment, targeted)
#   make test    set up .venv (plus the test-only references: transformers, peft) and run ruff and the tests
#                (about 3 minutes on 2 CPU cores)
#   make course  set up the lessons' requirements and execute every lesson in tutorials/ (copies in runs/course/)
# And the longer reproductions behind the README's tables (each writes its JSON into results/):
#   make compare        every table of the README from one build (experiments/reproduce.sh; docs/development.md
#                       §9): the reporting worlds 0 1 2, every row trained with training seeds 0 1 2, the
#                       attack suite, calibration, profiles, white-box attacks (two processes side by side;
#                       resumable; its measured time: docs/performance.md)
#   make folds          the recovery-based methods on held-out folds (every category held out once; not part of
#                       the README's build: twelve more worlds)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# the runtime (requirements.txt) for `make run`; the test-only references (transformers, peft, ruff, pytest) on top
# for `make test`
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt requirements-course.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

$(VENV)/.installed-course: $(VENV)/.installed requirements-course.txt
	$(PY) -m pip install -q -r requirements-course.txt
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

run: setup
	@echo "make run: world (~2 min, once), training (~1.5 min, once), attacks and report (~1.5 min)"
	$(PY) -m experiments.compare --seeds 0 --rows augment targeted --with-base --samples 0 \
		--finetune-attack 0 10 --finetune-prefill 0 10 --out runs/demo.json --report
	@echo "the report: runs/demo.html (open it in a browser)"

test: setup-test
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m pytest -q

course: $(VENV)/.installed-course
	$(PY) tutorials/run_course.py

compare: setup
	PY=$(PY) experiments/reproduce.sh

folds: setup
	$(PY) -m experiments.compare --folds --seeds 0 1 2 --rows augment insertion rto targeted --samples 0 --out results/folds.json
	$(PY) -m experiments.compare --folds --seeds 0 1 2 --rows augment insertion rto targeted --samples 16 --prefill 10 40 --benign-samples 0 --out results/folds_sampled.json
	$(PY) -m experiments.compare --merge results/folds.json results/folds_sampled.json --out results/folds.json

.PHONY: setup setup-test run test course compare folds
