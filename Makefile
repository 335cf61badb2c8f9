# Two commands on a fresh machine: `make demo` (closed-loop stacking demo) and `make test`.
# Each creates or updates the local venv by itself; a stamp file keeps re-runs fast.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
# DDS stays on loopback unless the caller chose otherwise; a per-run domain id keeps runs apart.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export ROS_DOMAIN_ID ?= $(shell echo $$(( $$$$ % 100 + 1 )))
export PYTHONUNBUFFERED = 1

.PHONY: venv demo test test-slow lint bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# MODEL=path.onnx runs another policy (e.g. a seeing one); unset, the demo's default model.
MODEL ?=
demo: venv
	$(VENV)/bin/gato-ros demo $(if $(MODEL),--model $(MODEL))

test: venv
	$(VENV)/bin/ruff check gato_ros sim tests launch scripts
	$(PY) -m pytest -q -m "not slow" tests

test-slow: venv
	$(PY) -m pytest -q -m slow tests

lint: venv
	$(VENV)/bin/ruff check gato_ros sim tests launch scripts

bench: venv
	$(VENV)/bin/gato-ros bench --json runs/bench.json

clean:
	rm -rf build install log runs
