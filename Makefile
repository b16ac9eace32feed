# Quick start: `make demo` then `make test`. Everything installs into .venv from nothing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
GPD    := $(VENV)/bin/gpd
DEMO   := build/demo
MODEL  := gpd_surgery.examples:small_cnn

.PHONY: install demo test test-fast zoo zoo-timm bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	mkdir -p $(DEMO)
	$(GPD) expand $(MODEL) --input-shape 1,3,32,32 --ratio 2 -o $(DEMO)/small_cnn.teacher.safetensors --force
	$(GPD) verify $(DEMO)/small_cnn.teacher.safetensors
	$(GPD) extract $(DEMO)/small_cnn.teacher.safetensors --force

# pytest exits 5 when it collects nothing: that is not a failure of the suite.
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# Every torchvision classification model at ratio 2 (long: about an hour on 2 cores); writes docs/zoo.md.
zoo: install
	$(PY) -m gpd_surgery.zoo --ratio 2 --output docs/zoo.md

# One model of each timm family (CNNs, ViTs, hybrids, MLPs) at ratio 2; writes docs/zoo-timm.md.
zoo-timm: install
	$(PY) -m gpd_surgery.zoo --source timm --ratio 2 --output docs/zoo-timm.md

# expand, extract, verify and the GPD training step against their floors (about 12 min on 2 cores);
# prints the table and writes it to docs/performance.md. Options: make bench BENCH_ARGS="--reps 3".
bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache .hypothesis
