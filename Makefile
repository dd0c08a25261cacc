# knockd-fast developer targets (GNU make). `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# Run with the venv's bin first on PATH, so tests and the demo find `knock` and `knockd-fast`.
IN_VENV := env PATH="$(CURDIR)/$(VENV)/bin:$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)"

# Debian packages: compiler, libpcap headers (found via pkg-config), and the tools the
# end-to-end tests drive (ip netns/veth, iptables, tcpdump; nft and ipset: the CLIs, for the
# tests to inspect and sabotage the nftables and ipset backends; groff: the man pages' test
# renders them). pyenv's python3 brings venv.
DEB_PACKAGES := build-essential pkg-config libpcap-dev iptables iproute2 tcpdump nftables \
                libnftables1 ipset groff-base
# Remaking the venv is keyed on these: a change reinstalls and rebuilds the extension.
STAMP        := $(VENV)/.stamp
STAMP_DEPS   := pyproject.toml setup.py client/pyproject.toml \
                $(wildcard _ext/*.pyx _ext/*.pxd _ext/includes/*.pxd _ext/includes/*.h)
LINT_PATHS   := setup.py $(wildcard client knockd_fast tests bench)
PYTEST       := $(IN_VENV) $(VPY) -m pytest -p no:cacheprovider
# The capture tests already run both twins side by side; this second run, with
# KNOCKD_FAST_NO_EXTENSIONS=1, proves the selector falls back to the pure twin on request.
PURE_TWIN_TESTS := tests/test_build.py tests/test_capture.py

.PHONY: deps venv build debug annotate test lint demo clean

deps:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(DEB_PACKAGES)"

# Installs the Debian packages in PACKAGES that are missing (apt-get; sudo when not root).
.PHONY: apt-install
apt-install:
	@missing=""; \
	for p in $(PACKAGES); do \
	  [ "$$(dpkg-query -W -f='$${Status}' $$p 2>/dev/null)" = "install ok installed" ] || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  echo "deps: installing$$missing"; \
	  $$sudo apt-get update && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Build requirements go into the venv and the root package is installed without build
# isolation: faster re-runs, and the editable install compiles the extension in place.
$(STAMP): $(STAMP_DEPS) | deps $(VPY)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $$($(VPY) -c 'import tomllib; print(" ".join( \
	  tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
	$(VPY) -m pip install -q -e ./client
	$(VPY) -m pip install -q --no-build-isolation -e .
	$(VPY) -m pip install -q --group test
	touch $@

# Rebuild the extension in place (optimised); --force so it also replaces a debug build.
build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace --force

# Same with -O0 -g and Cython line tracing; `make build` goes back to the optimised one.
debug: $(STAMP)
	KNOCKD_FAST_DEBUG=1 $(VPY) setup.py -q build_ext --inplace --force

# Cython's annotated HTML of capture.pyx: the yellower a line, the more Python C-API it calls
# (the per-packet functions should stay white). Only cythonizes; the build is untouched.
ANNOTATE_DIR := build/annotate
annotate: $(STAMP)
	@mkdir -p $(ANNOTATE_DIR)
	$(VENV)/bin/cython -a -I _ext/includes --module-name knockd_fast._capture_c \
	  -o $(ANNOTATE_DIR)/capture.c _ext/capture.pyx
	@echo "annotated source: $(ANNOTATE_DIR)/capture.html"

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)

# systemd-nspawn boots the unit under a real systemd in tests/test_unit_boot.py (PID 1 here
# is not systemd). Pinned to the host's own systemd version: the newest systemd-container
# would pull a systemd upgrade along. Where that version is gone from the archive, the
# test says so and skips; nothing else needs it.
.PHONY: nspawn
nspawn:
	@command -v systemd-nspawn >/dev/null && exit 0; \
	version=$$(dpkg-query -W -f='$${Version}' systemd 2>/dev/null) || exit 0; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	echo "nspawn: installing systemd-container=$$version"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	  "systemd-container=$$version" >/dev/null 2>&1 || \
	{ $$sudo apt-get update -qq >/dev/null 2>&1; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	  "systemd-container=$$version" >/dev/null 2>&1; } || \
	echo "nspawn: systemd-container $$version is not installable here: the unit boot test will skip"

# Debian's redis-server for the fleet's tests (tests/redis_server.py starts its own, on a
# port of its own, and stops it by PID): installed, never run as a service. Where no
# policy-rc.d refuses service starts (a container's does), one does so during the install,
# and the unit the package enables is disabled again.
.PHONY: redis
redis:
	@command -v redis-server >/dev/null && exit 0; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	policy=/usr/sbin/policy-rc.d; made=""; \
	if [ ! -e $$policy ]; then \
	  printf '#!/bin/sh\nexit 101\n' | $$sudo tee $$policy >/dev/null; $$sudo chmod 755 $$policy; \
	  made=1; \
	fi; \
	echo "redis: installing redis-server (not started: the tests start their own)"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	  redis-server >/dev/null 2>&1 || { $$sudo apt-get update -qq >/dev/null 2>&1; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	  redis-server >/dev/null; }; rc=$$?; \
	if [ -n "$$made" ]; then \
	  $$sudo rm -f $$policy; \
	  $$sudo deb-systemd-helper disable redis-server.service >/dev/null 2>&1 || true; \
	fi; \
	exit $$rc

test: lint nspawn redis
	$(PYTEST) tests
ifneq ($(strip $(PURE_TWIN_TESTS)),)
	KNOCKD_FAST_NO_EXTENSIONS=1 $(PYTEST) $(PURE_TWIN_TESTS)
endif

demo: $(STAMP)
	$(IN_VENV) bash demo/demo.sh

# Long fuzzing (not part of `make test`): the capture twins against each other on random
# hostile streams, and the protocol's properties, with many more hypothesis examples.
FUZZ_EXAMPLES ?= 20000
.PHONY: fuzz
fuzz: $(STAMP)
	KNOCKD_FAST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) KNOCK_PROTOCOL_PROFILE=protocol-thorough \
	  $(PYTEST) tests/test_capture_differential.py tests/test_protocol_properties.py

# Coverage-guided fuzzing with atheris (installed on first use): both twins on every input.
FUZZ_SECONDS ?= 600
.PHONY: fuzz-atheris
fuzz-atheris: $(STAMP)
	@$(VPY) -c 'import atheris' 2>/dev/null || $(VPY) -m pip install -q atheris
	$(IN_VENV) $(VPY) tests/fuzz_capture.py -max_total_time=$(FUZZ_SECONDS)

# Benchmarks (bench/README.md): packets/s of the bare libpcap loop, the Cython engine and the
# pure-Python twin over deterministic capture files, cached in bench/results/ (about 1.3 GB).
# Results land there as JSON (+ a PNG for the sweep). A benchmark never fails on time.
BENCH_RUN   := $(IN_VENV) $(VPY) bench/run.py
.PHONY: bench bench-quick bench-tools bench-grants bench-firewall bench-live bench-poison \
        bench-backlog bench-fleet

bench-tools: $(STAMP)
	@$(VPY) -c 'import matplotlib, tqdm' 2>/dev/null || $(VPY) -m pip install -q --group bench

bench: bench-tools
	$(BENCH_RUN) flood
	$(BENCH_RUN) sweep

# Live: a burst of accepted knocks between two namespaces; firewall commits vs capture.
# GRANT_BACKENDS="nftables" to narrow; GRANT_ARGS="--sources 5000 --waves 4" for longer.
GRANT_BACKENDS ?= iptables
GRANT_ARGS     ?= --sources 500 --waves 2
bench-grants: $(STAMP)
	for backend in $(GRANT_BACKENDS); do \
	  $(BENCH_RUN:run.py=grant_burst.py) $(GRANT_ARGS) --backend $$backend || exit 1; \
	done

# Every firewall backend's open/extend/close latency (p50, p99) with 10 to 100,000 live
# grants and its grants/s in one transaction, each in a namespace of its own.
# FIREWALL_ARGS="--backends nftables --sizes 10 1000" to narrow.
bench-firewall: bench-tools
	$(BENCH_RUN:run.py=firewall_latency.py) $(FIREWALL_ARGS)

# Blind digit poisoning: attack packets per knock -> share of genuine knocks accepted, for
# both knock.group_by settings (offline, the Cython engine and the verdict); about 3 minutes.
bench-poison: bench-tools
	$(BENCH_RUN:run.py=poison.py) $(POISON_ARGS)

# Garbage completions at 2x and 4x the judging capacity: share of genuine knocks accepted,
# fair backlog vs first come first served (the real judge, virtual time); about 4 minutes.
bench-backlog: $(STAMP)
	$(BENCH_RUN:run.py=backlog.py) $(BACKLOG_ARGS)

# Live, side by side with Debian's knockd: tcpreplay onto a veth between two namespaces
# (bench/README.md, "Live"); about 20 minutes. LIVE_ARGS="--ks 100,1000 --rates top" to narrow.
LIVE_PACKAGES := tcpreplay knockd
bench-live: bench-tools
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(LIVE_PACKAGES)"
	$(BENCH_RUN:run.py=live.py) all $(LIVE_ARGS)

# A fleet of gateways over Redis: a grant change on one gateway until it is in place on the
# last of the others, p50/p99 over 100 knocks, 3 runs (bench/fleet_propagation.py).
bench-fleet: $(STAMP) redis
	$(BENCH_RUN:run.py=fleet_propagation.py) $(FLEET_ARGS)

bench-quick: bench-tools
	$(BENCH_RUN) flood --quick
	$(BENCH_RUN) sweep --quick

# Debian packages (docs/admin.md, "Install from the Debian packages"): knockd-fast and
# python3-knock-client, built with Debian's own tools from packaging/debian/. The tracked
# tree (plus new files not ignored) is copied to build/deb/knockd-fast/ with that directory
# as debian/, so the checkout stays clean; the .debs land in build/deb/.
# PATH: Debian's python3 first (a pyenv or venv python3 would build for the wrong
# interpreter and miss Debian's cython3 and numpy).
DEB_BUILD_PACKAGES := debhelper dh-python pybuild-plugin-pyproject python3-all-dev \
                      python3-setuptools python3-wheel cython3 python3-numpy libpcap-dev \
                      pkg-config dpkg-dev
DEB_DIR  := build/deb
DEB_ENV  := env -u VIRTUAL_ENV -u PYTHONPATH -u PYTHONHOME -u KNOCKD_FAST_NO_EXTENSIONS \
            -u KNOCKD_FAST_DEBUG PATH=/usr/sbin:/usr/bin:/sbin:/bin
.PHONY: deb deb-check
deb:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(DEB_BUILD_PACKAGES)"
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/knockd-fast
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DEB_DIR)/knockd-fast
	cp -r packaging/debian $(DEB_DIR)/knockd-fast/debian
	@# One version: the changelog's must be both distributions' __version__.
	@cd $(DEB_DIR)/knockd-fast && v=$$(dpkg-parsechangelog -S Version) && \
	for f in knockd_fast/__init__.py client/knock_client/__init__.py; do \
	  grep -q "^__version__ = \"$$v\"$$" $$f || \
	    { echo "deb: packaging/debian/changelog says $$v, $$f does not" >&2; exit 1; }; \
	done
	cd $(DEB_DIR)/knockd-fast && $(DEB_ENV) dpkg-buildpackage -us -uc -b
	@ls -l $(DEB_DIR)/*.deb

# Installs the built packages with apt, checks them (version, check-config, the demo on
# /usr/bin, the capture and protocol tests against the installed modules) and purges them
# and whatever they pulled in, also on failure. Root; not part of `make test`.
deb-check: deb
	$(DEB_ENV) bash packaging/deb-check.sh $(DEB_DIR)

clean:
	rm -rf build client/build *.egg-info client/*.egg-info .hypothesis .pytest_cache
	rm -f knockd_fast/_capture_c*.so _ext/*.c $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
