# Everything runs inside ./.venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is what this machine kind has locally; on a GPU box
# `make setup TORCH_SPEC=torch` (or install torch yourself first) takes the CUDA build.
TORCH_SPEC ?= torch==2.13.0
TINY := models/tiny-llama

.PHONY: setup demo test bench gpu-check fuzz tiny clean lock test-latest test-floors test-windows

setup: $(VENV)/.installed

# constraints.txt is the locked set the suite passes with: every machine installs exactly it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# llama-cpp-python (test extra) compiles llama.cpp; its multimodal library is not needed
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" $(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

tiny: setup
	$(VENV)/bin/lora build-tiny --force --out $(TINY) --data data/demo.jsonl
	$(VENV)/bin/lora build-tiny --force --arch bert --out models/tiny-bert --data data/classify_demo.jsonl
	$(VENV)/bin/lora build-tiny --force --arch t5 --out models/tiny-t5 --data data/seq2seq_demo.jsonl

demo: setup
	@test -f $(TINY)/config.json || $(MAKE) --no-print-directory tiny
	$(VENV)/bin/lora train recipes/demo.yaml --overwrite
	$(VENV)/bin/lora generate --adapter runs/demo "用一句话解释什么是LoRA"

# pytest-xdist: TEST_WORKERS processes share the cores; --dist loadgroup keeps each test file on one
# worker (tests/conftest.py groups them) so a file's trained fixtures are built once, and
# --no-loadscope-reorder hands the groups out in conftest's order (longest first), not by test count.
TEST_WORKERS ?= 2
PARALLEL = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: setup
	$(PY) -m pytest -q $(PARALLEL)

# Property-based tests at scale (tests/adversarial/test_properties.py), outside the normal suite (which runs a
# few dozen examples each): FUZZ_CASES generated recipes, recipe bytes, --set values, data files and server
# requests in all, split evenly over the properties (10,000 = 2,000 for each of the 5; about 5 minutes on
# the loaded shared 2-core machine, docs/reliability.md). FUZZ_ARGS passes pytest options, e.g.
# FUZZ_ARGS='-k rows' (that property still gets its share; LORA_FUZZ_EXAMPLES=N in the environment sets the
# share instead). -s lets the progress lines (every 100 runs of a property, and each one's rate at its end)
# through pytest's capture.
FUZZ_CASES ?= 10000
FUZZ_ARGS ?=
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz LORA_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest -q -s -p no:cacheprovider $(FUZZ_ARGS) tests/adversarial/test_properties.py

bench: setup
	@test -f $(TINY)/config.json || $(MAKE) --no-print-directory tiny
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# Throwaway environments for the dependency targets; never the project's own .venv.
SCRATCH ?= /tmp/lora-deps
PIP_TEST = CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" $(SCRATCH)/bin/python -m pip install -q

# constraints.txt anew from the newest releases pyproject's ranges allow; run `make test` after it.
lock:
	rm -rf $(SCRATCH) && $(PYTHON) -m venv $(SCRATCH)
	$(SCRATCH)/bin/python -m pip install -q --upgrade pip
	$(SCRATCH)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PIP_TEST) -e ".[test]"
	$(PYTHON) tools/pins.py lock $(SCRATCH) > constraints.txt
	rm -rf $(SCRATCH)

# The suite on the newest releases (drift seen by choice, never in CI).
test-latest:
	rm -rf $(SCRATCH) && $(PYTHON) -m venv $(SCRATCH)
	$(SCRATCH)/bin/python -m pip install -q --upgrade pip
	$(SCRATCH)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PIP_TEST) --upgrade -e ".[test]"
	$(SCRATCH)/bin/python -m pip freeze > $(SCRATCH)/installed.txt
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SCRATCH)/bin/python -m pytest -q -p no:cacheprovider $(PARALLEL)

# The suite with every declared floor installed exactly (pyproject's floors are what it says).
test-floors:
	rm -rf $(SCRATCH) && $(PYTHON) -m venv $(SCRATCH)
	$(SCRATCH)/bin/python -m pip install -q --upgrade pip
	$(SCRATCH)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) tools/pins.py floors > $(SCRATCH)/floors.txt
	$(PIP_TEST) -c $(SCRATCH)/floors.txt -e ".[test]"
	$(SCRATCH)/bin/python -m pip freeze > $(SCRATCH)/installed.txt
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SCRATCH)/bin/python -m pytest -q -p no:cacheprovider $(PARALLEL)

# On a CUDA machine: the user path on the GPU and the bench_gpu table, into docs/benchmarks.md (< 8 min)
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf runs models .pytest_cache

# Windows CPython under Wine: lora check/schema and the writers' tests (tools/windows_check.sh;
# needs wine64, and mingw-w64 where Wine lacks bcryptprimitives.dll). Not Windows, not in CI.
test-windows: setup
	bash tools/windows_check.sh
