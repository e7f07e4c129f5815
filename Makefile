# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= runs/demo
STAMP   = $(VENV)/.dynres-installed

.PHONY: demo demo-quick test test-fast install jpegtran emoji-font clean

install: $(STAMP) jpegtran emoji-font

# ingest transcodes JPEG sources losslessly with libjpeg's jpegtran; installed here where we can (Debian, as root).
# Without it ingest falls back to mozjpeg-lossless-optimization (a pip dependency) and says so in one line.
jpegtran:
	@jpegtran -version 2>&1 | grep -q libjpeg-turbo && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing jpegtran (libjpeg-turbo-progs)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq libjpeg-turbo-progs >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libjpeg-turbo-progs >/dev/null 2>&1; } || true; \
	fi; \
	jpegtran -version 2>&1 | grep -q libjpeg-turbo || echo "libjpeg-turbo's jpegtran not installed: dynres ingest falls back to mozjpeg-lossless-optimization and says so"

# `dynres data photos` (the real-photo development set) draws Noto Color Emoji; installed the same way. Without it
# that command (and its tests) fail with one line naming the package; nothing else needs it.
emoji-font:
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing fonts-noto-color-emoji"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fonts-noto-color-emoji >/dev/null 2>&1; } || true; \
	fi; \
	test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || echo "fonts-noto-color-emoji not installed: dynres data photos needs it"

# torch/torchvision first and pinned: they are the big, slow part (local wheels on the dev machines).
$(STAMP): pyproject.toml requirements-torch.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/dynres demo --out $(OUT)

demo-quick: install
	$(BIN)/dynres demo --quick --out runs/demo-quick

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
