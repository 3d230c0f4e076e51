# kubehv: the two commands are `make demo` and `make test`; everything else is a helper of theirs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/kubehv
PYTEST_ARGS ?=
export KUBEHV_CACHE := $(CACHE)

.PHONY: all bootstrap apt venv controlplane node guest test lint typecheck unit demo demo-down bench crds lock clean

all: test

## bootstrap: install everything the tests and the demo need (idempotent, cached)
bootstrap: apt venv controlplane guest

apt:
	@bash hack/bootstrap-apt.sh

# The venv is rebuilt only when the lock file changes.
venv: $(VENV)/.stamp
$(VENV)/.stamp: requirements.lock pyproject.toml
	@$(PY) -m pip --version >/dev/null 2>&1 || python3 -m venv --clear $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@echo "kubehv: installing pinned Python dependencies into $(VENV)" >&2
	@$(PY) -m pip install -q -r requirements.lock
	@$(PY) -m pip install -q --no-deps -e .
	@touch $@

controlplane:
	@bash hack/controlplane/build.sh >/dev/null

guest:
	@bash tests/guest/build-guest.sh >/dev/null
	@bash tests/guest/build-cloud-image.sh >/dev/null

# The real node's binaries (kubelet, controller-manager, scheduler, kube-proxy, pause) for
# tests/kubelet; its image layers are built and cached by the tests (kubehv/devenv/image.py).
node:
	@bash hack/controlplane/build.sh --node >/dev/null

lint: venv
	$(VENV)/bin/ruff check kubehv tests bench
	$(VENV)/bin/ruff format --check kubehv tests bench
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy

## test: every test, with the real parts (libvirtd, QEMU, kube-apiserver + etcd) started by the tests
test: bootstrap node lint typecheck
	PATH="$$PATH:$$(bash hack/controlplane/build.sh)" $(VENV)/bin/pytest $(PYTEST_ARGS)

unit: venv
	$(VENV)/bin/pytest -m "not real_libvirt and not apiserver and not e2e and not faults and not kubelet" $(PYTEST_ARGS)

## demo: a local control plane, the controller and one node agent, the examples applied
# PATH gets the control-plane build dir last: its kubectl (built there when none is on PATH).
demo: bootstrap
	PATH="$$PATH:$$(bash hack/controlplane/build.sh)" $(PY) -m kubehv.demo up

demo-down:
	-PATH="$$PATH:$$(bash hack/controlplane/build.sh)" $(PY) -m kubehv.demo down

## bench: speed and memory figures against the physical floor -> bench/results.json
bench: bootstrap
	PATH="$$PATH:$$(bash hack/controlplane/build.sh)" $(PY) -m bench.run

crds: venv
	$(PY) -m kubehv.cli crds --output-dir crds
	$(PY) -m kubehv.cli crds --output-dir manifests/base/crds
	$(PY) -m kubehv.cli crds --reference --output docs/reference.md

lock:
	python3 -m venv /tmp/kubehv-lock-venv && /tmp/kubehv-lock-venv/bin/pip install -q -r requirements.txt \
	  && /tmp/kubehv-lock-venv/bin/pip freeze --exclude-editable | grep -v '^kubehv' > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
