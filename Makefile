# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= runs/demo
STAMP   = $(VENV)/.dynres-installed

.PHONY: demo demo-quick test test-fast install clean

install: $(STAMP)

# torch/torchvision first and pinned: they are the big, slow part (local wheels on the dev machines).
$(STAMP): pyproject.toml requirements-torch.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dynres demo --out $(OUT)

demo-quick: $(STAMP)
	$(BIN)/dynres demo --quick --out runs/demo-quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
