# The two commands of the README, plus helpers. Each target sets up what it needs (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: run test setup benchmark clean

## run: train + evaluate the DK Mask R-CNN on the embedded dk_shapes dataset (CPU, 10-30 minutes on 2 cores)
run: setup
	bash scripts/run_embedded_job.sh

## test: the whole pytest suite on the CPU (CUDA tests skip without a GPU)
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

## setup: .venv/ with pinned dependencies and dk_detectron2._C built in place
setup:
	bash scripts/setup_env.sh

## benchmark: the benchmark suite (op level, model level, scaling); results in benchmarks/
benchmark: setup
	$(PY) -m benchmarks --output benchmarks

clean:
	rm -rf build dk_detectron2/_C*.so
