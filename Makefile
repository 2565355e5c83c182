# Two commands do all the set-up: `make demo` and `make test`.
# torch is installed first, pinned to the CPU build that lies on this machine's disk,
# so that no later requirement pulls a multi-GB CUDA build. On a GPU machine, install
# your own torch and then `pip install -e .` instead.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean bench serve

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

# tests/test_packaging.py installs the built wheel into a fresh venv with this same torch.
test: $(VENV)/.test
	VLMKIT_TORCH="$(TORCH)" $(PY) -m pytest -q tests

bench: $(VENV)/.test
	$(PY) benchmarks/bench_clip_cpu.py

clean:
	rm -rf $(VENV) runs
