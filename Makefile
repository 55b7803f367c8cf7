# Two commands for a fresh clone (see README): `make quick` and `make test`.
# Each creates .venv and installs what it needs on first use; nothing else is required.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= quick
# Where torch comes from. Empty: PyPI (on Linux the ~5 GB CUDA build). For CPU wheels:
#   make quick TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: quick test site install install-dev clean-venv gpu gpu-cpu gpu-prep

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# re-install when the package metadata changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,inception,diffusers]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The main job: train the `quick` preset on FashionMNIST on the CPU (the bundled test split when
# the full set is not there), then write a sample grid and a denoising GIF + MP4 to results/$(RUN)/.
# Re-running continues the run (or just re-renders when it is finished).
quick: $(VENV)/.installed
	$(BIN)/python -m ddpm_nb train --preset quick --name $(RUN) --resume
	$(BIN)/python -m ddpm_nb sample results/$(RUN) --num 64 --out results/$(RUN)
	$(BIN)/python -m ddpm_nb animate results/$(RUN) --num 16 --out results/$(RUN)

# Unit tests + every notebook at tiny size under nbmake, in one pytest run.
# pytest exits 5 when it collects nothing: that means the suite is broken, so it fails too.
test: $(VENV)/.installed-dev
	@DDPM_NB_TINY=1 $(BIN)/python -m pytest -q --durations=8 --nbmake --nbmake-timeout=600 \
	  --ignore-glob='notebooks/_scratch*' tests notebooks; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$status

# The rendered course: run every lesson at full size (CPU is fine, with the shipped models) and write
# HTML to site/ (only the pages whose lesson changed; `SITE_ARGS=--all` for every page).
# tests/test_site.py fails when a lesson changed since its page was rendered.
SITE_ARGS ?=
site: $(VENV)/.installed-dev
	$(BIN)/python scripts/make_site.py $(SITE_ARGS)

# The one-command GPU run (benchmarks/gpu_run.sh; README "Benchmarks"). `make gpu-prep` here packs
# Flowers102 into .carry/ and the peers' wheels into .whl/; `make gpu` on the CUDA machine (its own
# python3, no venv: <= 9 minutes, <= 8 files in $OUT or results/gpu_run/); `make gpu-cpu` rehearses
# every stage at tiny size on the CPU (results/gpu_run_cpu/).
gpu:
	bash benchmarks/gpu_run.sh

gpu-cpu: $(VENV)/.installed
	PYTHON=$(BIN)/python bash benchmarks/gpu_run.sh --cpu

gpu-prep: $(VENV)/.installed
	PYTHON=$(BIN)/python bash benchmarks/prep_gpu.sh

clean-venv:
	rm -rf $(VENV)
