# The commands people actually run.
.PHONY: install test gpu-test bench lint format

install:  ## CPU machine: pinned torch CPU build, Triton 3.6, the package and its dev tools
	pip install -c .ci/constraints.txt -e '.[dev]'

test:  ## CPU tier (Triton interpreter), what CI runs
	python -m pytest

gpu-test:  ## GPU tier + kernel benchmarks (on a CUDA machine)
	bash scripts/gpu_suite.sh

bench:  ## kernel benchmarks only (on a CUDA machine)
	python -m tritonformer.bench

lint:
	ruff check tritonformer tests

format:
	ruff format tritonformer tests
