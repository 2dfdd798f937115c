# Every target does its own set-up on a fresh machine.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
# `make test-min`: every dependency at the lowest version pyproject.toml allows, in a venv of its own.
MIN_VENV ?= .venv-min
MIN_STAMP := $(MIN_VENV)/.installed
# The browser tests drive Debian's chromium (tests/test_browser.py).
CHROMIUM := /usr/bin/chromium

.PHONY: install lint test test-min demo clean

# Where torch comes from. On Linux, PyPI's `torch` is the CUDA build (several GB with its
# nvidia-* wheels); PyTorch's own CPU index serves the CPU build (~200 MB), which is all the
# suite and the demo use. A GPU machine: `make TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (your CUDA's index), or install that torch into $(VENV) first: pip keeps a torch it finds there.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

# $(call venv,DIR,PIP-OPTIONS): a venv with torch 2.13.0 from TORCH_INDEX first (pip's own
# configuration, e.g. a local wheel folder, still applies), then medlvr with its extras.
define venv
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX)
	$(1)/bin/pip install -q $(2) -e ".[web,test]"
	touch $(1)/.installed
endef

$(STAMP): pyproject.toml
	$(call venv,$(VENV))

# The floor pins are read from pyproject.toml (each `>=X` becomes `==X`), so the floor
# stated there is the floor tested.
$(MIN_STAMP): pyproject.toml
	mkdir -p $(MIN_VENV)
	$(PY) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	  deps = p["dependencies"] + [d for extra in p["optional-dependencies"].values() for d in extra]; \
	  print("\n".join(re.sub(r">=([^,;]+).*", r"==\1", d) for d in deps))' > $(MIN_VENV)/floor.txt
	$(call venv,$(MIN_VENV),-c $(MIN_VENV)/floor.txt)

install: $(STAMP)

# The lint and type gate first: a finding fails the run before the tests start.
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy medlvr

test: lint $(CHROMIUM) $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The fast tests (no `slow` marker) on the floor versions.
test-min: $(MIN_STAMP)
	$(MIN_VENV)/bin/python -m pytest -n 2 --dist loadgroup -m "not slow"

$(CHROMIUM):
	$(if $(filter 0,$(shell id -u)),,$(error the browser tests need Debian's chromium: run `sudo apt-get update && sudo apt-get install -y chromium` and then `make test` again))
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

demo: $(STAMP)
	$(BIN)/medlvr demo --out runs/demo

clean:
	rm -rf $(VENV) $(MIN_VENV) runs
