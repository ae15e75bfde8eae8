# Set-up and everyday commands. `make install` is quick when nothing changed (a stamp file tracks it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geosoc-installed

.PHONY: install demo test test-slow bench lock clean docs

install: $(STAMP)

# Every package at the version pinned in requirements.lock (uv is in it, so `uv pip sync` keeps it), then geosoc in
# editable mode. uv installs the lock about 8x faster than pip here (109 s against 876 s from an empty cache on a
# busy 2-core machine); `make install INSTALLER=pip` takes the pip route, where torch and torchvision go in together
# first: other pairs fail to import or download several GB (see docs/install.md).
INSTALLER ?= uv
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(PY) -m pip install -q "$$(grep '^uv==' requirements.lock)"
	$(VENV)/bin/uv pip sync -q --python $(PY) requirements.lock
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps -e .
else
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
endif
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

# The docs site (mkdocs.yml, docs/) into site/, warnings as errors. The packages are pyproject.toml's `docs` extra,
# pinned in requirements.lock.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(PY) -m pip freeze --exclude-editable | grep -vi '^geosoc' > requirements.lock

clean:
	rm -rf geosoc-data .pytest_cache
