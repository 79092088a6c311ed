# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv from constraints.txt when it is missing (and reuse it when it is there).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit benchmark notebooks strip-notebooks clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,notebooks]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) train.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

# One thread per worker process (notebook kernels and torchrun children too): 2 workers, 2 cores.
unit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -q --durations=15

test: lint typecheck unit

benchmark: $(STAMP)
	$(PY) benchmarks/attention_overhead.py

# JupyterLab in the project's environment, opened on notebooks/ (each notebook trains the small
# model it needs when given no checkpoint; set SDETR_CACHE to choose where it is cached).
notebooks: $(STAMP)
	$(PY) -m jupyter lab notebooks/

# Clear outputs, execution counts and saved widget state before committing (make test checks it).
strip-notebooks: $(STAMP)
	$(PY) -m jupyter nbconvert --clear-output --inplace \
		--ClearMetadataPreprocessor.enabled=True --ClearMetadataPreprocessor.clear_cell_metadata=False \
		--ClearMetadataPreprocessor.preserve_nb_metadata_mask='[("kernelspec",), ("language_info",)]' \
		notebooks/*.ipynb

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache outputs
