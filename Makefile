# Two commands do all the set-up: `make demo` and `make test`.
# torch is installed first, pinned to the CPU build that lies on this machine's disk,
# so that no later requirement pulls a multi-GB CUDA build. On a GPU machine, install
# your own torch and then `pip install -e .` instead.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean bench serve browser

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

# The demo draws figures: the plots extra (matplotlib) on top of the runtime.
$(VENV)/.plots: $(VENV)/.core
	$(PY) -m pip install -q -e ".[plots]"
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.core

demo: $(VENV)/.plots
	$(VENV)/bin/vlmkit demo --out runs/demo

$(VENV)/.serve: $(VENV)/.core
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

# The HTTP service on the demo run (trains a tiny CLIP first when runs/demo/run is absent): http://127.0.0.1:8000/docs
serve: $(VENV)/.serve
	$(VENV)/bin/vlmkit serve --demo

# The browser test (tests/serve/test_browser.py) drives Debian's chromium through chromedriver.
# Installed here when missing and apt-get can run (as root, or with password-less sudo); otherwise,
# or if apt-get fails, one line says so and that test skips. Nothing runs when both are present.
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make: no chromium and no apt-get: the browser test will skip"; \
	  else \
	    if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	    else SUDO="none"; fi; \
	    if [ "$$SUDO" = none ]; then \
	      echo "make: chromium is missing and apt-get needs root: the browser test will skip"; \
	    else \
	      echo "make: installing chromium and chromium-driver for the browser test (apt-get, a few minutes)"; \
	      ( $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	          chromium chromium-driver ) >/dev/null 2>&1 \
	        || echo "make: apt-get could not install chromium: the browser test will skip"; \
	    fi; \
	  fi; \
	fi

# tests/test_packaging.py installs the built wheel into a fresh venv with this same torch.
test: $(VENV)/.test browser
	VLMKIT_TORCH="$(TORCH)" $(PY) -m pytest -q tests

bench: $(VENV)/.test
	$(PY) benchmarks/bench_clip_cpu.py

clean:
	rm -rf $(VENV) runs
