# One command each: `make demo` (install + run the pipeline on the offline testbed), `make test`, `make bench`,
# `make docs` (the documented numbers from the committed result files; `make docs DOCS_ARGS=--check` only checks).
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch goes in first and pinned: a bare `pip install transformers ...` would pull a multi-GB CUDA build.
# On a GPU machine use e.g. `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH ?= torch==2.13.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

.PHONY: install test demo bench docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $@

# One pytest worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures run once.
# TEST_WORKERS=0 runs in one process (e.g. to debug with -x --pdb).
TEST_WORKERS ?= auto
test: install
	$(OFFLINE) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: install
	$(OFFLINE) $(PY) run.py experiment=testbed_demo

bench: install
	$(OFFLINE) $(PY) -m mlalign.bench

docs: install
	$(OFFLINE) $(PY) -m mlalign.docs_numbers $(DOCS_ARGS)

clean:
	rm -rf outputs multirun .cache
