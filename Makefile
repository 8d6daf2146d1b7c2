# Two commands do all set-up on a fresh machine (see README):
#   make play   — create/update .venv from requirements.txt and run the playground (ARGS="--tiny" etc.)
#   make test   — create/update .venv with the test dependencies and Ray, install Chromium, run the test suite
# and one optional step:
#   make detectron2 — build Detectron2 (not on PyPI) into .venv: its panoptic segmenter (things and stuff)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

#: Where `make detectron2` builds Detectron2 from: its upstream repository, or a local copy (D2_SRC=folder).
D2_URL := git+https://github.com/facebookresearch/detectron2.git
D2_SRC ?= $(D2_URL)

.PHONY: play test browser detectron2

# The package itself is installed in editable mode (no dependencies: requirements.txt pins them), so that
# `import ipag` works from any folder and always runs this checkout's code.
$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt requirements-ray.txt
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt -r requirements-ray.txt
	touch $@

# Browser tests drive Debian's Chromium through Playwright (browsers cannot be downloaded by Playwright here).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

play: $(VENV)/.runtime
	$(PY) playground.py $(ARGS)

test: $(VENV)/.dev browser
	$(PY) -m pytest $(ARGS)

# Detectron2 compiles C++ against the torch already in .venv (hence --no-build-isolation: an isolated build would
# fetch another torch; the build's own tools, wheel and ninja, come first). A failed build changes nothing: the
# segmenter "auto" stays torchvision's Mask R-CNN.
detectron2: $(VENV)/.runtime
	@echo "Building Detectron2 from $(D2_SRC) into $(VENV): C++ compiled against torch, about 3 min on 2 cores..."
	@start=$$(date +%s); \
	if $(PY) -m pip install --disable-pip-version-check -q wheel ninja && \
	   $(PY) -m pip install --disable-pip-version-check -q --no-build-isolation "$(D2_SRC)"; then \
	  echo "Detectron2 built and installed in $$(( $$(date +%s) - start )) s: the segmenter 'auto' is now its panoptic FPN."; \
	else \
	  echo "Detectron2 could not be built (above: it needs a C++ compiler, and git and network for $(D2_URL);"; \
	  echo "D2_SRC=<folder> builds a local copy). Nothing changed: the playground keeps torchvision's Mask R-CNN."; \
	  exit 1; \
	fi
