# Set-up and entry points. `make demo` and `make test` create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that lies on these machines' disk; a torch already in $(VENV)
# (your own CUDA build, say) is kept and this is never installed over it.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output

.PHONY: install demo lint test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[models,plot,test,lint]"
	touch $@

# Example reads from a fixed seed, predicted with the tiny models by two CPU workers
# through a broker started for the run; the previous demo's output is replaced.
demo: install
	$(PY) tools/make_example_reads.py $(DEMO_DIR)/example_reads.fa
	rm -rf $(DEMO_DIR)/predictions
	$(VENV)/bin/virnucpro predict $(DEMO_DIR)/example_reads.fa -o $(DEMO_DIR)/predictions \
		--models tiny --weighted --steal --workers 2

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q tests/unit

# Dask, for the comparison in tools/bench_peers.py.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) $(DEMO_DIR) *.egg-info .pytest_cache

# The README's benchmark figures (about 25 minutes on 2 cores; bench_transfer writes 3 GB to $TMPDIR);
# bench_peers and bench_seeding rewrite their tables in README.md.
bench: install $(VENV)/.bench-installed
	mkdir -p bench-results
	$(PY) tools/bench_peers.py --json bench-results/peers.json --update-readme README.md
	$(PY) tools/bench_seeding.py --json bench-results/seeding.json --update-readme README.md
	$(PY) tools/bench_correction.py --json bench-results/correction.json --throughput-log bench-results/correction.jsonl
	$(PY) tools/plot_timeline.py bench-results/correction.jsonl -o bench-results/timeline.png
	$(PY) tools/bench_overhead.py --json bench-results/overhead.json
	$(PY) tools/chaos.py --json bench-results/chaos.json --markdown bench-results/chaos.md
	$(PY) tools/bench_refine_loop.py --json bench-results/refine_loop.json
	$(PY) tools/bench_pipeline.py --pairs 3 --processes 1,2 --json bench-results/pipeline.json
	$(PY) tools/bench_transfer.py --json bench-results/transfer.json
