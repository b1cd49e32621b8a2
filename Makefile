# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + tests).
VENV := .venv/bin

.PHONY: setup demo test bench
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/adjointdpm demo --out outputs/demo

test: setup
	$(VENV)/python -m pytest -n 2 -q

bench: setup
	$(VENV)/python -m adjointdpm.bench
