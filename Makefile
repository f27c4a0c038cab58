# Two entry points, each working from a fresh clone with only python3 + pip present:
#   make quickstart   set up .venv, then run the offline demo
#   make test         set up .venv, then the whole test suite (Ray tests run in a private net namespace)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# DeepSpeed's JIT ops are cached here so they are built once, during set-up.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export HF_HUB_OFFLINE ?= 1
STAMP := $(VENV)/.setup-done

.PHONY: setup quickstart test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/build_ds_ops.py scripts/choose_torch.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build without an NVIDIA driver, the CUDA build the driver supports with one
	# (scripts/choose_torch.py says which; TORCH_INDEX_URL overrides it).
	$(PY) -m pip install -q $$($(PYTHON) scripts/choose_torch.py $(TORCH_VERSION))
	$(PY) -c "import torch; print('set-up: installed torch', torch.__version__, '(CUDA ' + torch.version.cuda + ')' if torch.version.cuda else '(CPU only)')"
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) scripts/build_ds_ops.py
	touch $(STAMP)

quickstart: setup
	$(VENV)/bin/rayft quickstart ./quickstart

# The tests' MLflow tracking server, in a venv of its own: the full mlflow package pins pyarrow<26, while
# rayft (and its client, mlflow-skinny) use pyarrow 26.
MLFLOW_SERVER := $(VENV)/mlflow-server/bin/mlflow
export RAYFT_MLFLOW_SERVER ?= $(CURDIR)/$(MLFLOW_SERVER)

$(MLFLOW_SERVER):
	$(PYTHON) -m venv $(VENV)/mlflow-server
	$(VENV)/mlflow-server/bin/pip install -q "mlflow==3.17.2"

# Ray-using tests run inside a private network + pid namespace: only loopback exists and no process outlives the run.
# The two set-ups in parallel: the MLflow server's venv installs while DeepSpeed's ops compile (.venv first:
# the server's venv lives inside it, and two `python -m venv` racing for it fail).
test:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(MAKE) -j2 setup $(MLFLOW_SERVER)
	scripts/netns.sh $(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# Benchmarks (not tests): each prints a markdown table and writes bench/results/<name>.json.
bench: setup $(MLFLOW_SERVER)
	test -d quickstart/base || $(VENV)/bin/rayft quickstart ./quickstart
	scripts/netns.sh $(PY) bench/hf_compare.py
	scripts/netns.sh $(PY) bench/data_scale.py
	scripts/netns.sh $(PY) bench/length_batching.py
	scripts/netns.sh $(PY) bench/hardware.py
	scripts/netns.sh $(PY) bench/methods.py ./quickstart
	scripts/netns.sh $(PY) bench/zero_memory.py
	scripts/netns.sh $(PY) bench/planner_calibration.py
	scripts/netns.sh $(PY) bench/search_compare.py --record --quickstart ./quickstart
	scripts/netns.sh $(PY) bench/cluster_submit.py ./quickstart
	scripts/netns.sh $(PY) bench/overhead.py ./quickstart
	scripts/netns.sh $(PY) bench/claims.py ./quickstart
	scripts/netns.sh $(PY) bench/tracking_overhead.py ./quickstart
	$(PY) bench/report.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) quickstart runs .pytest_cache
