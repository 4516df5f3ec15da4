# `make test` and `make demo` set everything up themselves on a fresh machine.
PYTHON ?= python3
unexport PYTHONDONTWRITEBYTECODE  # let Python and pytest cache compiled modules between runs
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build installs from local disk on these machines; a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_run

.PHONY: venv test test-fast test-slow lint demo bench gpu-check clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: venv lint  # everything, in two processes of one thread each (pytest-xdist): the two cores, not oversubscribed
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m "not slow"

test-slow: venv  # what make test leaves out: the other methods' two-rank SIGTERM and resume runs, the CPU run of gpu-check
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal -m slow

test-fast: venv  # the quick tests only: no command line run, no model, fewer hypothesis examples (seconds)
	HYPOTHESIS_PROFILE=fast OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not e2e"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: venv
	rm -rf $(DEMO_DIR)
	$(PY) tests/assets.py $(DEMO_DIR)
	$(PY) finetune_lora.py $(DEMO_DIR)/checkpoint --data JSON --data.json_path $(DEMO_DIR)/data --data.num_workers 0 \
		--out_dir $(DEMO_DIR)/out --precision 32-true --train.global_batch_size 4 --train.micro_batch_size 2 \
		--train.max_steps 6 --train.lr_warmup_steps 2 --eval.interval 3 --eval.max_new_tokens 8 --eval.initial_validation true

bench: venv
	$(PY) bench/scan.py
	$(PY) bench/padding.py

gpu-check: venv  # on a CUDA machine (under 5 min on one H100): CUDA tests, train orders' tokens/s -> gpu_check.json
	$(PY) bench/gpu_check.py $(GPU_CHECK_FLAGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .hypothesis build *.egg-info
