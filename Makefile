# Each target creates .venv (if needed) and installs what it needs.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo cluster-demo test bench lint guest clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# An editable install leaves pyhv uncompiled, and with PYTHONDONTWRITEBYTECODE set every
	@# process would compile it from source again (~35 ms of each `pyhv run`); pip compiles a
	@# normal install itself. A source edited later is recompiled in memory, never run stale.
	$(PY) -m compileall -q pyhv
	touch $(STAMP)

guest: $(STAMP)
	$(PY) -m pyhv.guest_image build

# The book's "Watching Dynamic Memory" at a quarter of the book's lazy delays (about 90 s).
demo: $(STAMP)
	$(PY) -m pyhv.cli experiment watch-dynamic-memory --time-scale 0.25

# Three hosts as network namespaces (root): a short host relieved by live migration, then
# killed; its HA VMs restart elsewhere (about a minute; docs/cluster.md).
cluster-demo: $(STAMP)
	$(PY) -m pyhv.cli experiment cluster --out out/cluster/cluster

lint: $(STAMP)
	$(VENV)/bin/ruff check pyhv tests bench tools
	$(VENV)/bin/ruff format --check pyhv tests bench tools
	$(VENV)/bin/mypy pyhv
	$(PY) tools/import_cycles.py pyhv

# The tests run first so their results show even when lint fails; both must pass.
test: $(STAMP)
	@status=0; $(PY) -m pytest -q -ra tests || status=$$?; \
	$(MAKE) --no-print-directory lint || status=$$((status ? status : 1)); \
	exit $$status

# Every bench writes bench/results/<bench>.json; docs/benchmarks.md is then generated from them
# (bench/report.py). About 8.5 minutes on a 2-core PVM host (502 s on 2026-12-06), and bench/fuzz.py
# 10 s per decoder (~3 minutes); PYHV_BENCH_QUICK=1 for a quick run.
# A failing bench fails the target, after the others ran and the doc was regenerated.
BENCHES := intercepts boot dynmem dynmem_host balancer migration
BENCHES += cluster
BENCHES += smartpaging
BENCHES += fuzz

# pyhv compiled as an install leaves it, also after sources changed since the venv was made
bench: $(STAMP)
	@$(PY) -m compileall -q pyhv >/dev/null
	@start=$$(date +%s); status=0; \
	for b in $(BENCHES); do \
		echo "== bench/$$b.py ($$(( $$(date +%s) - start )) s)"; \
		$(PY) bench/$$b.py || { echo "bench/$$b.py failed"; status=1; }; \
	done; \
	$(PY) -m bench.report || status=1; \
	echo "make bench: $$(( $$(date +%s) - start )) s"; exit $$status

clean:
	rm -rf $(VENV) build guest/build
