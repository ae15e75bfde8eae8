# Set-up and everyday commands. `make install` is quick when nothing changed (a stamp file tracks it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geosoc-installed

.PHONY: install demo test test-slow bench lock clean docs

install: $(STAMP)

# torch and torchvision go in together first: other pairs fail to import or download several GB
# (see docs/architecture.md). Everything else comes pinned from requirements.lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: install
	$(VENV)/bin/geosoc demo

# Lint and type checks first (seconds), then the tests on two workers (a test file stays on one worker, so its
# module fixtures are made once; each worker has its own session fixtures: a trained tiny region, a Ray head;
# files start in the order tests/conftest.py gives, longest first).
test: install
	$(VENV)/bin/ruff check geosoc jobs tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

test-slow: install
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m slow

bench: install
	$(PY) tests/benchmarks/startup.py
	$(PY) tests/benchmarks/cube_write.py
	$(PY) tests/benchmarks/sampling.py
	$(PY) tests/benchmarks/training.py
	$(PY) tests/benchmarks/inference.py
	$(PY) tests/benchmarks/maps_scale.py

# The docs site (mkdocs.yml, docs/) into site/, warnings as errors. The packages are pyproject.toml's `docs` extra.
docs: install
	$(PY) -m pip install -q 'mkdocs>=1.6' 'mkdocs-material>=9.5' 'mkdocstrings-python>=1.10'
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(PY) -m pip freeze --exclude-editable | grep -vi '^geosoc' > requirements.lock

clean:
	rm -rf geosoc-data .pytest_cache
