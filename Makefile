# Set-up and entry points. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on these machines' disk; a torch already in $(VENV)
# (your own CUDA build, say) is kept and this is never installed over it.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[models,plot,test]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info .pytest_cache
