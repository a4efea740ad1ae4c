# soupkit: two commands for a new user (see README):
#   make reproduce   set up a local .venv and regenerate the tables and figures (embedded default)
#   make test        set up the same .venv and run unit tests + notebook checks (nbval)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.soupkit-installed
PRESET ?= embedded
OUT ?= outputs
# notebooks (and nbval checks) run side by side when their inputs are ready; 2 = the cores of the CI machine
JOBS ?= 2
# pip on some machines prints one warning per unreachable local index: hide only those lines
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: setup test reproduce clean

$(STAMP): requirements.txt requirements-data.txt requirements-test.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt -r requirements-test.txt $(QUIET)
	$(BIN)/pip install -q --no-deps -r requirements-data.txt $(QUIET)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(QUIET)
	touch $(STAMP)

setup: $(STAMP)

# nbval re-executes every notebook and compares its outputs with the committed ones, one group of notebooks
# at a time (soupkit.runner --stages: each group needs only the groups before it), JOBS at once
test: setup
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m soupkit.runner --stages > $(VENV)/nbval-stages
	while read -r group; do \
	  OMP_NUM_THREADS=$$(( $$(nproc) / $(JOBS) > 0 ? $$(nproc) / $(JOBS) : 1 )) \
	    $(BIN)/python -m pytest -q -p no:cacheprovider -n $(JOBS) --dist loadfile --nbval $$group < /dev/null || exit 1; \
	done < $(VENV)/nbval-stages

reproduce: setup
	$(BIN)/python -m soupkit.runner --preset $(PRESET) --out $(OUT) --jobs $(JOBS)

clean:
	rm -rf $(VENV) $(OUT)
