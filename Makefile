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
# seconds one notebook cell may run under nbval (its own default, 2000, failed notebook 01's zoo cell on a loaded
# 2-core machine: the cell takes about 1700 s here with notebooks 03 and 09 beside it); a hang still ends here
NBVAL_CELL_TIMEOUT ?= 10800
# pip on some machines prints one warning per unreachable local index: hide only those lines
QUIET := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: setup lab test install-check reproduce update-committed clean

$(STAMP): requirements.txt requirements-data.txt requirements-test.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt -r requirements-test.txt $(QUIET)
	$(BIN)/pip install -q --no-deps -r requirements-data.txt $(QUIET)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . $(QUIET)
	touch $(STAMP)

# JupyterLab settings of this venv (jupyter/overrides.json): no autosave, so opening and running a committed
# notebook changes the file only when the user saves it
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings/overrides.json
$(LAB_SETTINGS): jupyter/overrides.json $(STAMP)
	mkdir -p $(dir $@) && cp jupyter/overrides.json $@

# IPython kernel settings of this venv (jupyter/ipython_kernel_config.py): hides ipykernel's TCP-encryption warning
KERNEL_CONFIG := $(VENV)/etc/ipython/ipython_kernel_config.py
$(KERNEL_CONFIG): jupyter/ipython_kernel_config.py $(STAMP)
	mkdir -p $(dir $@) && cp jupyter/ipython_kernel_config.py $@

setup: $(STAMP) $(LAB_SETTINGS) $(KERNEL_CONFIG)

# JupyterLab from the repository root (open notebooks/; each kernel runs in its notebook's folder)
lab: setup
	$(BIN)/jupyter lab --notebook-dir=.

# Unit tests run JOBS at once (pytest-xdist). nbval then re-executes every notebook on a copy in a temporary folder,
# beside a copy of data/ (the committed benchmark results notebook 11 reads; the committed notebooks, figures/ and
# outputs/ stay untouched) and compares what does not depend on float rounding; then soupkit.experiments.drift
# compares the rerun's tables with the committed figures/*.csv within the measured tolerances of
# soupkit/experiments/tolerances.csv. `runner --nbval` checks JOBS notebooks at once, one pytest process each, every
# notebook as soon as the notebooks it reads are done (runner.DEPENDS; no barrier between groups).
test: setup
	$(BIN)/python -m pytest -q -n $(JOBS) tests
	$(MAKE) --no-print-directory install-check
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; mkdir -p "$$tmp/notebooks"; \
	cp notebooks/*.ipynb "$$tmp/notebooks/"; cp -r data "$$tmp/"; \
	$(BIN)/python -m soupkit.experiments.runner --nbval --notebooks "$$tmp/notebooks" --jobs $(JOBS) \
	  --nbval-cell-timeout $(NBVAL_CELL_TIMEOUT) < /dev/null; \
	$(BIN)/python -m soupkit.experiments.drift check figures "$$tmp/figures" --exclude "claims.csv"

# the library as users install it: `pip install .` (not editable, no extras: torch, safetensors, numpy, tqdm) into
# a fresh venv, from a copy of the tracked files, then make_soup from a folder outside the checkout
install-check:
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; mkdir "$$tmp/src"; \
	git ls-files -z | { grep -zv -e '^notebooks/' -e '^figures/' || true; } | tar --null -cf - -T - | tar -xf - -C "$$tmp/src"; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q -c constraints.txt "$$tmp/src" $(QUIET); \
	cd "$$tmp" && "$$tmp/venv/bin/python" "$$tmp/src/tests/installed_check.py"

# records and figures go to $(OUT) (never a tracked file); for the embedded default the run's tables are then
# compared with the committed figures/ within the measured tolerances (a report: it does not fail the run)
reproduce: setup
	$(BIN)/python -m soupkit.experiments.runner --preset $(PRESET) --out $(OUT) --jobs $(JOBS)
	if [ "$(PRESET)" = embedded ]; then \
	  $(BIN)/python -m soupkit.experiments.drift check figures $(OUT)/figures --exclude "claims.csv" \
	    || echo "some numbers of this run differ from the committed figures/ by more than the tolerances above"; \
	fi

# maintainers: refresh the committed figures/ and notebooks' outputs from a run of the embedded default
update-committed: setup
	$(BIN)/python -m soupkit.experiments.runner --preset embedded --out $(OUT) --jobs $(JOBS) --update-committed

clean:
	rm -rf $(VENV) $(OUT)
