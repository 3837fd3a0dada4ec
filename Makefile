# MagLens: `make run` opens the viewer on the demo slide, `make test` runs the whole suite.
# Both create the virtual environment on first use (VENV may point elsewhere, e.g. in CI).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maglens-installed
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: run test bench venv clean-venv check-deps deps

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

# Qt's X11 plugin needs system libraries the PySide6 wheel does not carry (libxcb-cursor0 and
# more on minimal systems): say which, with the apt-get line, before anything is installed.
check-deps:
	@python3 tools/check_qt_deps.py

# Installs the missing ones (running `make deps` is the go-ahead; prints the sudo line otherwise).
deps:
	@python3 tools/check_qt_deps.py --install

run: check-deps $(STAMP)
	$(PY) -m app

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) benchmarks/viewer_bench.py
	$(PY) benchmarks/engine_bench.py

clean-venv:
	rm -rf $(VENV)
