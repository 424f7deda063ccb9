# The two commands in the README are `make demo` and `make test`; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
DIFFTRAIN := $(VENV)/bin/difftrain
# On this CPU-only machine torch==2.13.0 resolves to a local CPU build. On a GPU machine,
# install the CUDA build of torch into $(VENV) first (pytorch.org's selector gives the
# command); setup then keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean-demo mini-sd

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	test -f data/shapes/metadata.jsonl || $(DIFFTRAIN) data shapes data/shapes
	$(DIFFTRAIN) train configs/demo.yaml $$(ls runs/demo/checkpoints/step-*/state.json >/dev/null 2>&1 && echo --resume latest)
	$(DIFFTRAIN) sample runs/demo --num 16 --scheduler euler_a --steps 30 --seed 0 --out runs/demo/grid.png
	$(DIFFTRAIN) sample runs/demo --num 8 --scheduler all --steps 30 --seed 0 --out runs/demo/schedulers.png

# A whole Stable Diffusion from nothing on this CPU: a VAE, then a text-conditioned UNet on its latents.
mini-sd: setup
	test -f data/shapes/metadata.jsonl || $(DIFFTRAIN) data shapes data/shapes
	test -f models/mini-base/model_index.json || $(DIFFTRAIN) model tiny-sd models/mini-base
	test -f runs/mini-vae/model/config.json || $(DIFFTRAIN) train configs/mini-sd/vae.yaml $$(ls runs/mini-vae/checkpoints/step-*/state.json >/dev/null 2>&1 && echo --resume latest)
	$(DIFFTRAIN) train configs/mini-sd/unet.yaml $$(ls runs/mini-sd/checkpoints/step-*/state.json >/dev/null 2>&1 && echo --resume latest)

test: setup
	$(PY) -m pytest -q

clean-demo:
	rm -rf runs/demo
