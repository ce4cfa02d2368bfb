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
	iperf3 iputils-ping tcpdump ca-certificates procps curl

TESTENV_DIR := integration-tests/testenv
TESTENV_BIN := $(TESTENV_DIR)/bin/testenv
TESTENV_SRCS := $(wildcard $(TESTENV_DIR)/*.go) $(TESTENV_DIR)/go.mod $(TESTENV_DIR)/go.sum

.PHONY: help deps apt-deps testenv cargo-fuzz build test fmt-check lint unit-test demo bench crds fuzz clean

help:
	@echo "wiremesh targets:"
	@echo "  make demo   - local multi-node cluster of network namespaces with a real kube-apiserver"
	@echo "  make test   - the whole test suite (installs what it needs first)"
	@echo "  make bench  - throughput/latency ratios against wireguard-go, boringtun-cli and plain veth;"
	@echo "               eBPF datapath throughput with 1,000 policy rules vs none"
	@echo "  make lint   - rustfmt check and clippy -D warnings"
	@echo "  make deps   - install Debian packages, build the testenv kube-apiserver"
	@echo "  make crds   - regenerate deploy/crds/*.yaml"
	@echo "  make fuzz   - fuzz the annotation parser for FUZZ_SECONDS (default 60)"

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

deps: apt-deps testenv

# The kube-apiserver + etcd test bed. Rebuilt only when its sources change; the first build downloads
# k8s.io/kubernetes and its dependencies and compiles them (minutes), later ones come from Go's cache.
testenv: $(TESTENV_BIN)

$(TESTENV_BIN): $(TESTENV_SRCS)
	@command -v $(GO) >/dev/null || { echo "make testenv: Go 1.26 is needed (no go in PATH)" >&2; exit 1; }
	cd $(TESTENV_DIR) && $(GO) build -buildvcs=false -o bin/testenv .

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

# The demo: a real kube-apiserver, nodes and pods as network namespaces, one mesh-agent per node.
# Leaves nothing behind: a failed `demo up` removes what it started, and `demo down` runs whatever
# the traffic and status steps report.
DEMO_NODES ?= 3
DEMO_PODS_PER_NODE ?= 2
MESHCTL = $(or $(CARGO_TARGET_DIR),target)/debug/meshctl

demo: deps
	@if [ "$$(id -u)" != 0 ]; then echo "make demo: needs root (network namespaces, TUN devices)" >&2; exit 1; fi
	@echo "==> building mesh-agent and meshctl"
	$(CARGO) build -p mesh-agent -p meshctl
	@echo
	@echo "==> meshctl demo up --nodes $(DEMO_NODES) --pods-per-node $(DEMO_PODS_PER_NODE)"
	@$(MESHCTL) demo up --nodes $(DEMO_NODES) --pods-per-node $(DEMO_PODS_PER_NODE)
	@status=0; \
	echo; echo "==> cross-node pod traffic through the WireGuard mesh (ping, TCP echo, UDP echo)"; \
	$(MESHCTL) demo traffic || status=1; \
	echo; echo "==> eBPF flow records of each agent (/flows)"; \
	$(MESHCTL) demo flows || status=1; \
	echo; echo "==> meshctl status"; \
	$(MESHCTL) status --kubeconfig "$$($(MESHCTL) demo kubeconfig)" || status=1; \
	echo; echo "==> meshctl demo down"; \
	$(MESHCTL) demo down || status=1; \
	if [ $$status = 0 ]; then echo "==> demo passed"; else echo "==> demo FAILED" >&2; fi; \
	exit $$status

# Benchmarks (root): veth vs wireguard-go vs boringtun-cli vs our engine; eBPF datapath with no
# policy vs ~1,000 rules (variant `policy`, bpf/examples/datapath-bench).
# BENCH_ARGS are passed to bench/bench.py (e.g. BENCH_ARGS="--runs 5 --time 10").
BENCH_TOOLS := bench/.tools
BORINGTUN_CLI := $(BENCH_TOOLS)/bin/boringtun-cli
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release -p mesh-agent --bin mesh-agent --example engine-floor
	$(CARGO) build --release -p wiremesh-bpf --example datapath-bench
	@if [ ! -x $(BORINGTUN_CLI) ]; then \
		echo "installing boringtun-cli into $(BENCH_TOOLS)"; \
		$(CARGO) install --locked boringtun-cli --root $(BENCH_TOOLS); \
	fi
	python3 bench/bench.py --ours "$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/mesh-agent" \
		--boringtun $(BORINGTUN_CLI) \
		--datapath-bench "$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/datapath-bench" \
		--engine-floor "$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/engine-floor" \
		$(BENCH_ARGS)

FUZZ_SECONDS ?= 60
# cargo-fuzz needs nightly rustc features; without a nightly toolchain, stable with RUSTC_BOOTSTRAP=1.
cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz

fuzz: cargo-fuzz
	@mkdir -p .cache/fuzz/annotations
	cd keyexchange && if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then tc=+nightly; boot=; else tc=; boot=1; fi; \
		RUSTC_BOOTSTRAP=$$boot $(CARGO) $$tc fuzz run annotations ../.cache/fuzz/annotations fuzz/corpus/annotations -- \
		-max_total_time=$(FUZZ_SECONDS)

clean:
	$(CARGO) clean
	rm -rf $(TESTENV_DIR)/bin
