# Every target does its own set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# A CPU build of torch first, so no multi-GB CUDA build is pulled in.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[web,test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/medlvr demo --out runs/demo

clean:
	rm -rf $(VENV) runs
