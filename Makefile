# Two commands on a fresh machine: `make pipeline` and `make test`. Each makes .venv when missing.
PY      ?= python3
VENV    ?= .venv
PROFILE ?= edge-cpu
RECIPE  ?= recipes/digits.yaml
RESUME  ?= 0
NPROC   ?= 1
SET     ?=
# SET="distill.method=dkd distill.epochs=50": recipe settings for this run (pipeline --set, README: Recipes);
# split at spaces, so a value with spaces (a YAML list or mapping) goes to `pipeline run --set` directly
SETS     = $(foreach s,$(SET),--set '$(s)')
RUN     ?= runs/latest
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: pipeline search test test-deps bench bench-quant bench-data gate ship report render clean help

help:
	@echo "make pipeline [PROFILE=edge-cpu|server-gpu|jetson] [RECIPE=...] [SET='KEY=VALUE ...'] [RESUME=1] [NPROC=2]"
	@echo "make search [PROFILE=...] [RECIPE=recipes/digits-64.yaml] [P95=ms] [MAX_DROP=0.01] [RESUME=1]"
	@echo "make test | make bench | make bench-data | make bench-quant | make gate PROFILE=... | make ship PROFILE=... | make report"

# Reinstall only when pyproject.toml changes; torch/torchvision are pinned there.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

# `pipeline check` first: a bad file, model or device fails in seconds, not mid-run
pipeline: $(STAMP)
	$(BIN)/pipeline check --profile $(PROFILE) --recipe $(RECIPE) $(SETS)
	$(BIN)/pipeline run --profile $(PROFILE) --recipe $(RECIPE) $(SETS) --nproc $(NPROC) $(if $(filter 1,$(RESUME)),--resume,)

# The most accurate model meeting every budget among the recipe's `search:` space (README: Search). RECIPE defaults
# to digits-64 here; P95 and MAX_DROP replace the profile's p95_latency_ms and max_accuracy_drop (empty: the
# profile's); RESUME=1 continues runs/search-latest with the budgets it started with.
SEARCH_RECIPE := $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),recipes/digits-64.yaml)
P95      ?= 0.5
MAX_DROP ?= 0.01
search: $(STAMP)
	$(BIN)/pipeline check --profile $(PROFILE) --recipe $(SEARCH_RECIPE)
	$(BIN)/pipeline search --profile $(PROFILE) --recipe $(SEARCH_RECIPE) $(if $(filter 1,$(RESUME)),--resume,\
	  $(if $(P95),--p95 $(P95)) $(if $(MAX_DROP),--max-drop $(MAX_DROP)))

# System tools the tests use for real: an OpenSSH server (shipping, device runner) and Chromium (report render).
test-deps:
	@missing=""; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null \
	      || echo "warning: could not install$$missing; the tests that need them will skip with the reason"; \
	  else echo "note:$$missing missing and not root: the tests that need them will skip with the reason"; fi; \
	fi

test: $(STAMP) test-deps
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --profile $(PROFILE)

# INT8 variants (minmax, best calibration, + exclusion, QAT) of the digits-64 pruned student vs FP32;
# BENCH_QUANT_ARGS="--run runs/<id>" reuses a finished run instead of training one
bench-quant: $(STAMP)
	$(BIN)/python scripts/bench_quant.py --profile $(PROFILE) $(BENCH_QUANT_ARGS)

# Peak memory of whole runs on 224x224 ImageFolders (BENCH_DATA_ARGS="--sizes 2000,20000"), KD epoch
# throughput against a plain DataLoader loop, data.cache on 32x32: table + bench-results/bench-data.json
bench-data: $(STAMP)
	$(BIN)/python scripts/bench_data.py $(BENCH_DATA_ARGS)

gate: $(STAMP)
	$(BIN)/pipeline gate $(RUN) --profile $(PROFILE) $(GATE_ARGS)

ship: $(STAMP)
	$(BIN)/pipeline ship $(RUN) --profile $(PROFILE)

report: $(STAMP)
	$(BIN)/pipeline report $(RUN)

render: $(STAMP)
	$(BIN)/python -m pipeline.report.render $(RUN)/report.html $(RUN)/report.png

clean:
	rm -rf runs bench-results
