# Two commands for users: `make train` and `make test`. Both run `make setup` first, which is a no-op when
# pyproject.toml has not changed since the last successful set-up.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.setup-stamp
PYTHON := $(VENV)/bin/python

.PHONY: setup train test bench lint lint-python mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  echo "installing ffmpeg with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq ffmpeg; }
	@[ -x $(PYTHON) ] || $(PY) -m venv $(VENV) || { \
	  echo "python venv module missing: installing python3-venv with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq python3-venv && $(PY) -m venv $(VENV); }
	$(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > $(VENV)/requirements.txt
	$(PYTHON) -m pip install -q -r $(VENV)/requirements.txt
	@touch $(STAMP)

train: setup
	$(PYTHON) train.py

test: setup lint-python
	$(PYTHON) -m pytest -q

bench: setup
	$(PYTHON) -m benchmark all --quick

# ruff (pinned in the dev extras) is the one formatter and linter; `make test` enforces it.
lint-python: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

lint: lint-python
	$(VENV)/bin/hadolint docker/Dockerfile

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml); not part of `make test`: a full run
# takes over an hour on 2 cores (docs/mutation.md has the measured times). MUTANTS="optimisation* models.temporal*"
# limits it to some modules; the score table and the survivors go to mutants/report.md.
MUTANTS ?=
mutate: setup
	GCVIDEO_SHARED_DATA=$(abspath ../shared/data) OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(foreach m,$(MUTANTS),'$(m)')
	$(PYTHON) tests/mutation_report.py > mutants/report.md
	cat mutants/report.md

clean:
	rm -rf $(VENV) runs data/synthetic mutants
