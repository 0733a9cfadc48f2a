# make run   - set up, build the demo corpus if missing, train the demo model with live metrics
# make test  - set up, run the test suite
# make bench - the benchmarks under bench/ (about 2 hours on a 2-core CPU)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt only when requirements.txt changes.
READY := $(VENV)/.requirements-installed

.PHONY: run test demo bench clean

$(READY): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@cp requirements.txt $(READY)

demo: $(READY)
	$(PY) demo_corpus.py --out data/demo

run: demo
	$(PY) model_trainer.py --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: $(READY)
	$(PY) -m pytest -q -rs tests

$(VENV)/.bench-installed: bench/requirements.txt $(READY)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	@cp bench/requirements.txt $@

bench: demo $(VENV)/.bench-installed
	$(PY) bench/attention.py
	$(PY) bench/long_context.py
	$(PY) bench/cross_modal.py
	$(PY) bench/data_throughput.py
	$(PY) bench/peer_step.py
	$(PY) bench/layer_patterns.py
	$(PY) bench/flops.py
	$(PY) bench/profile_step.py
	$(PY) bench/compile_blocks.py
	$(PY) bench/data_stall.py
	$(PY) bench/predict.py
	$(PY) bench/real_recordings.py
	$(PY) bench/mixed_gpus.py
	$(PY) bench/ddp_overlap.py
	$(PY) bench/long_range.py

clean:
	rm -rf data runs
