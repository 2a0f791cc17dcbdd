# Each target sets itself up on a fresh machine: it creates .venv and installs the package with its
# test extras when pyproject.toml is newer than the last install.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-data study clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hf-cifd demo --output_dir outputs/demo $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests $(ARGS)

# The Fashion-MNIST Table-1 study (resumable; results/fmnist/). Debian's package holds the data offline; without it
# (or without root) the loader reads zalando-datasets/fashion_mnist from the Hub.
study: $(STAMP)
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "dataset-fashion-mnist not installed: reading zalando-datasets/fashion_mnist from the Hub"
	$(PY) scripts/study_fmnist.py $(ARGS)

bench: $(STAMP)
	mkdir -p outputs
	HF_HUB_OFFLINE=1 $(PY) scripts/bench.py --json results/bench/bench.json --profile $(ARGS)

bench-data: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/bench_data.py

clean:
	rm -rf outputs .pytest_cache
