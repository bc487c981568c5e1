# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install cfseg with its pinned dependencies (constraints.txt pins the CPU
# torch wheel), then write the torchvision start-up fix (see cfseg/_torchvision_compat.py).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cfseg-installed
JOBS   ?= 2

.PHONY: install demo test lint clean help

help:
	@echo "make demo   - set up .venv if needed, then run the demo end to end on synthetic data"
	@echo "make test   - set up .venv if needed, then run the test suite"
	@echo "make lint   - ruff check"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -c "from cfseg._torchvision_compat import install_pth; print('wrote', install_pth())"
	$(PY) -c "import lightning, torchmetrics, open_clip, monai; print('imports ok')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cfseg-demo

test: $(STAMP)
	$(VENV)/bin/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo 'pytest collected no tests: failing'; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) results data/synthetic .pytest_cache
