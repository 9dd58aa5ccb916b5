# mcdrop — the two commands: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench bench-uci bench-fuzz lock clean chromium

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mcdrop needs Python 3.11 or newer (set PY=python3.x)")'
	@$(PY) -m venv $(VENV)

# Installs from the pinned constraints; output is kept in a log and shown only on failure.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	@$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]' \
		>$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log; exit 1; }
	@touch $@

install: $(STAMP)

## run: API + one worker on http://127.0.0.1:$${MCDROP_PORT:-8000} (SQLite + embedded broker unless configured)
run: install
	@$(BIN)/mcdrop up

## chromium: Debian's Chromium for the dashboard's browser tests, installed only when missing (as root);
## without it those tests are skipped
chromium: | $(BIN)/python
	@test -x /usr/bin/chromium || { { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		>$(VENV)/chromium-install.log 2>&1 || echo "chromium could not be installed (see $(VENV)/chromium-install.log): the dashboard browser tests will be skipped"; }

## test: the whole test suite (needs PostgreSQL and Redis on 127.0.0.1, see .ci/run)
test: install chromium
	@$(BIN)/python -m pytest

bench: install
	@$(BIN)/python -m bench

## bench-gpu: items 1, 2, 6 and the sweep engine on CUDA (prints "no CUDA device" and exits 0 without one)
bench-gpu: install
	@$(BIN)/python -m bench.gpu

## bench-uci: the MC dropout paper's UCI table through the HTTP API (long; needs ../shared/uci)
bench-uci: install
	@$(BIN)/python -m bench.uci

## bench-fuzz: schemathesis, the long profile: EXAMPLES generated requests per operation and mode, no 5xx allowed
EXAMPLES ?= 200
bench-fuzz: install
	@$(BIN)/python -m bench.fuzz_api --examples $(EXAMPLES)

## lock: regenerate constraints.txt from a fresh environment
lock:
	@rm -rf .lock-venv && $(PY) -m venv .lock-venv
	@.lock-venv/bin/pip install -q --disable-pip-version-check '.[test]' >/dev/null 2>&1
	@{ echo "# Pinned versions for every install of mcdrop (pip install -c constraints.txt ...)."; \
	   echo "# Regenerate: make lock (fresh venv, install, pip freeze)."; \
	   .lock-venv/bin/pip freeze --exclude mcdrop | sed 's/+cpu$$//'; } > constraints.txt
	@rm -rf .lock-venv

clean:
	rm -rf $(VENV) var
