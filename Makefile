# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: install run test
install:
	bash scripts/install.sh

run: install
	$(PYTHON) main.py

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q
