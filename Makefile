# Two commands do all set-up on a fresh machine (see README):
#   make play   — create/update .venv from requirements.txt and run the playground (ARGS="--tiny" etc.)
#   make test   — create/update .venv with the test dependencies and Ray, install Chromium, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: play test browser

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
