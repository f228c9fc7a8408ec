# Two commands for a fresh machine:  `make demo` (the embedded CPU demo) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast param-count clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Everything, the slow end-to-end cases included (what CI runs). --dist loadscope keeps a module on
# one worker, so its module-scoped fixtures (a trained demo run, a two-process run) are built once.
# Three workers on two cores: the third fills the gaps the others leave (imports, single-threaded
# compiles, waits on subprocesses): 15:03 against 16:00 with two and 14:58 with four, on a 2-core
# machine (before tests/conftest.py's compile flags; now 12:15 with three).
test: $(STAMP)
	$(PY) -m pytest tests -q -n 3 --dist loadscope --durations=15

# Unit tests only.
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -n 3 --dist loadscope -m "not slow"

param-count: $(STAMP)
	$(PY) -m simvlm_jax.models.param_count

demo: $(STAMP)
	$(PY) -m tasks.demo

clean:
	rm -rf $(VENV)
