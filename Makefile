# make demo  -- set up .venv and run the main job (tiny model, through the daemon)
# make test  -- set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# pytest-xdist workers for `make test`. Many tests wait on daemons, subprocesses and sockets, so more workers
# than the CI machine's 2 cores pay: 4 keep both cores busy (measured: 1.9 cores on average) and more would only
# add workers (each imports the whole suite) competing for them.
# loadgroup: the tests of one xdist_group mark share a worker (see the marks in tests/).
TEST_WORKERS ?= 4

.PHONY: setup demo test browser postgres tmux bench clean install-service

# The venv sees system site-packages so that a CUDA torch already installed on a GPU box is kept;
# torch is installed (CPU build) only when none can be imported.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -e ".[test]"
	# open_clip ships CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), from which the trainer builds the
	# CLIP tokenizers of single-file SD/SDXL checkpoints offline. Only that file is used: --no-deps keeps its
	# torchvision/timm requirements (a PyPI torchvision breaks beside a CUDA or CPU torch of another build) out.
	$(PY) -m pip install --no-deps "open_clip_torch==3.3.0"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/agentd demo

test: setup browser postgres tmux
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The report test (tests/test_report.py) drives headless Chromium, Debian's `chromium` package. Installed
# here when it is missing and we may (root with apt-get); quick when present. Otherwise that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing chromium for the report's browser test (apt-get)" && \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed (needs root and apt-get): the report's browser test will be skipped"

# The sweep test (tests/test_sweep_daemon.py) starts a throwaway PostgreSQL cluster (initdb as a non-root user in
# a temp folder): Debian's `postgresql` package, installed here the same way. Otherwise that test skips.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing postgresql for the sweep test (apt-get)" && \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "postgresql not installed (needs root and apt-get): the sweep's daemon test will be skipped"

# The live progress display's acceptance test (tests/test_console.py) runs `agentd run` in a tmux pseudo-terminal,
# Debian's `tmux` package: installed here like chromium, otherwise that test skips.
tmux:
	@command -v tmux >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    echo "installing tmux for the live progress display's terminal test (apt-get)" && \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; } || \
	  echo "tmux not installed (needs root and apt-get): the live progress display's terminal test will be skipped"

bench: setup
	$(PY) bench/run_all.py

install-service: setup
	$(VENV)/bin/agentd install-service

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-output
