# Chimera: `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use and install the project with the exact pins in constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo bench install clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# reinstall only when the dependency declarations change (idempotent otherwise)
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,eval]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# offline: make demo SOURCE=../shared/data/tinyshakespeare/input.txt
demo: $(STAMP)
	$(PY) jobs/demo.py $(if $(SOURCE),--source $(SOURCE))

bench: $(STAMP)
	$(PY) jobs/bench.py models

clean:
	rm -rf $(VENV) .pytest_cache
