# moe_dist developer entry points.  `make test` is the test command (also what .ci/run runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-dev
# torch is installed first and pinned so the CPU build stays in place (`pip install -e .[dev]`
# then finds it satisfied).  Where the default index only has CUDA wheels, pass e.g.
#   make venv TORCH_PIP_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_FLAGS ?=
PYTEST_ARGS ?=
DATA := data/stdlib.bin

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu

.PHONY: venv demo test gpu-check clean distclean

venv: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-runs only when setup.py changes, so `make test` is fast after the first install.
$(STAMP): setup.py | $(VENV)/bin/python
	$(PIP) install $(TORCH_PIP_FLAGS) '$(TORCH_SPEC)'
	$(PIP) install -e '.[dev]'
	touch $@

$(DATA): | $(STAMP)
	$(VENV)/bin/moe-dist prepare-data --out $@

# Expert-parallel training on CPU ranks: 4 gloo processes, experts split over ep=2, data over dp=4
# (edp=2 copies of each expert). Progress and the per-expert load across ranks print on rank 0; the loss
# curve and the expert-load heatmap land in runs/tiny-cpu/<date-time>/: every `make demo` trains afresh in a
# folder of its own and leaves earlier demos' runs as they were. torchrun's agent runs through
# moe_dist.parallel.torchrun_agent, which reports a failed launch as one line instead of torch's traceback.
# OMP_NUM_THREADS=1 is what torchrun sets when it is unset, where it also prints a banner saying so; the CLI then
# gives each rank its share of the cores (torch.set_num_threads), so the value only silences the banner.
NPROC ?= 4
DEMO_ARGS ?= --parallel.ep=2 --train.steps=300 --train.eval_every=50
demo: venv $(DATA)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m moe_dist.parallel.torchrun_agent --standalone \
		--nproc_per_node $(NPROC) -m moe_dist.cli train configs/tiny-cpu.yaml \
		--train.out_dir=runs/tiny-cpu/$$(date +%Y%m%d-%H%M%S) $(DEMO_ARGS)

# pytest's own exit code is kept in .cache/pytest-exit-code because make reports every failure
# as 2; 5 means no tests were collected, which counts as a failure.
test: venv
	@mkdir -p .cache
	@rc=0; $(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS) || rc=$$?; \
	echo $$rc > .cache/pytest-exit-code; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	exit $$rc

# One command that proves the GPU path (benchmarks/gpu_check.py): Triton kernels compiled against their references,
# kernel speed, the MoE layer against the dense ideal, 50 bf16 training steps per expert backend; a table of targets
# last, JSON and PNGs in benchmarks/results/gpu_check.*. Without a GPU it rehearses every part on the CPU (tiny
# shapes, Triton's interpreter) into runs/bench/gpu_check_rehearsal.json and says that no GPU figure was produced.
# The Python: GPU_PYTHON when given; else .venv's (made first, as for every target) unless there is no .venv and
# $(PYTHON) already imports moe_dist.kernels and torch (a GPU machine with the package installed in its own Python).
GPU_PYTHON ?=
GPU_CHECK_ARGS ?=
gpu-check:
	@if [ -n "$(GPU_PYTHON)" ]; then py="$(GPU_PYTHON)"; \
	elif [ ! -x $(VENV)/bin/python ] && $(PYTHON) -c 'import moe_dist.kernels, torch' >/dev/null 2>&1; then py="$(PYTHON)"; \
	else $(MAKE) --no-print-directory venv PYTHON=$(PYTHON) && py=$(VENV)/bin/python; fi; \
	PYTHONUNBUFFERED=1 $$py benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .cache .pytest_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data/*.bin data/*.json data/*.tmp
