# Two commands on a fresh machine: `make demo` and `make test`.
# Both create the virtualenv when it is missing and install the project into it.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the DVC pipeline on params.yaml (the offline digits demo by default); the stage
# commands call `python`, so the virtualenv goes first on PATH. One torch thread per
# process unless OMP_NUM_THREADS says otherwise: two threads are faster on idle cores but
# many times slower when another job holds one of them.
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro
	$(PY) -m stages.summary metrics.json

# two workers, a test file each at a time (its module fixtures, a built DVC project or a
# Prefect server, stay in one process): most tests wait on one-thread subprocesses or
# servers, so the second core was idle; each worker's torch runs one thread (tests/conftest.py)
test: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf runs .pytest_cache
