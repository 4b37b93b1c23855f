# Two commands for a fresh machine with Python 3.11, pip and gcc: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch from local disk where the machine has one; any recent torch works with the package.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv lint clean

venv: $(VENV)/.installed

# The package and its runtime dependencies: all `make demo` needs. One pip call installs torch and the package
# together (the venv's own pip is recent enough for an editable install: no upgrade first); where the torch pin
# cannot be had, torch's CPU index, then the package.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if $(BIN)/python -c "import torch" 2>/dev/null; then $(BIN)/python -m pip install -q -e .; \
	elif ! $(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e .; then \
		$(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
		&& $(BIN)/python -m pip install -q -e .; fi
	touch $@

# The test tools on top (pytest, ruff, triton for the interpreter tests of the GPU kernel), and open_clip's loss,
# a peer in tests and benchmarks; its torchvision requirement is not needed for loss.py.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps open-clip-torch || echo "open-clip-torch unavailable: its parity test will skip"
	touch $@

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/siglip train --config configs/demo.yaml --out runs/demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs build src/*.egg-info
