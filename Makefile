# Two entry points: `make demo` (the whole system on built-in data) and
# `make test` (the test suite). Both create or update the virtual environment
# from pyproject.toml first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Nothing may be fetched from a hub at run time; libraries that phone home are told not to.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast demo demo-tasks bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m demo.run $(DEMO_ARGS)

# the other four downstream tasks, fine-tuned from the demo's pretrained model (runs `make demo` first if needed)
demo-tasks: $(STAMP)
	$(PY) -m demo.tasks $(DEMO_TASKS_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/download.py
	$(PY) benchmarks/vqa.py

clean:
	rm -rf runs/demo runs/demo_tasks
