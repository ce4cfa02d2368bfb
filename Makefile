# wiremesh task runner. Every target installs what it needs on a fresh Debian 12 machine, idempotently.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
GO ?= go
export CARGO_TERM_COLOR ?= never
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)

# Debian packages the build, the tests and the demo use.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev pkg-config iproute2 wireguard-tools wireguard-go \
	iperf3 iputils-ping tcpdump ca-certificates procps

TESTENV_DIR := integration-tests/testenv
TESTENV_BIN := $(TESTENV_DIR)/bin/testenv

.PHONY: help deps apt-deps build test fmt-check lint unit-test demo bench crds clean

help:
	@echo "wiremesh targets:"
	@echo "  make demo   - local multi-node cluster of network namespaces with a real kube-apiserver"
	@echo "  make test   - the whole test suite (installs what it needs first)"
	@echo "  make bench  - throughput/latency ratios against wireguard-go, boringtun-cli and plain veth"
	@echo "  make lint   - rustfmt check and clippy -D warnings"
	@echo "  make deps   - install Debian packages, build the testenv kube-apiserver"
	@echo "  make crds   - regenerate deploy/crds/*.yaml"

# Installs only the packages that are missing, so a second run does nothing.
apt-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: need root to install$$missing" >&2; exit 1; fi; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

deps: apt-deps

build: deps
	$(CARGO) build --workspace --all-targets

fmt-check:
	$(CARGO) fmt --all -- --check

lint: deps fmt-check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-test: deps
	$(CARGO) test --workspace --no-fail-fast

test: deps build lint unit-test

crds:
	$(CARGO) run -q -p wiremesh-crds --bin crdgen -- --out deploy/crds

demo: deps
	@echo "make demo: the virtual cluster arrives with issue 4 (mesh on a real Kubernetes API); not built yet." >&2
	@exit 1

# Userspace WireGuard benchmark (root): veth vs wireguard-go vs boringtun-cli vs our engine.
# BENCH_ARGS are passed to bench/bench.py (e.g. BENCH_ARGS="--runs 5 --time 10").
BENCH_TOOLS := bench/.tools
BORINGTUN_CLI := $(BENCH_TOOLS)/bin/boringtun-cli
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release -p mesh-agent
	@if [ ! -x $(BORINGTUN_CLI) ]; then \
		echo "installing boringtun-cli into $(BENCH_TOOLS)"; \
		$(CARGO) install --locked boringtun-cli --root $(BENCH_TOOLS); \
	fi
	python3 bench/bench.py --ours "$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/mesh-agent" \
		--boringtun $(BORINGTUN_CLI) $(BENCH_ARGS)

clean:
	$(CARGO) clean
	rm -rf $(TESTENV_DIR)/bin
