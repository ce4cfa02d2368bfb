# wiremesh task runner. Every target installs what it needs on a fresh Debian 12 machine, idempotently.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
GO ?= go
export CARGO_TERM_COLOR ?= never
export PATH := $(HOME)/.cargo/bin:/usr/local/go/bin:$(PATH)

# Debian packages the build, the tests and the demo use. The kernel VM tests (integration-tests/src/vm.rs)
# need qemu, a static busybox for the initramfs, kmod (depmod/modprobe on the unpacked kernel package)
# and xz (the uncompressed vmlinux); they download the kernel package themselves (apt-get download).
# buildah: `make image` and the deploy_image test (hack/build-image.sh) build the OCI image with it.
APT_PACKAGES := clang llvm libbpf-dev libelf-dev pkg-config iproute2 wireguard-tools wireguard-go \
	iperf3 iputils-ping tcpdump ca-certificates procps curl \
	qemu-system-x86 busybox-static kmod xz-utils chromium buildah

TESTENV_DIR := integration-tests/testenv
TESTENV_BIN := $(TESTENV_DIR)/bin/testenv
TESTENV_SRCS := $(wildcard $(TESTENV_DIR)/*.go) $(TESTENV_DIR)/go.mod $(TESTENV_DIR)/go.sum

.PHONY: help deps apt-deps testenv clients sbom-tool install-plugin image deploy-manifests cargo-fuzz build test fmt-check lint \
	unit-test demo bench bench-scale crds fuzz clean

help:
	@echo "wiremesh targets:"
	@echo "  make demo   - local multi-node cluster of network namespaces with a real kube-apiserver"
	@echo "  make test   - the whole test suite (installs what it needs first)"
	@echo "  make bench  - throughput/latency ratios against wireguard-go, boringtun-cli and plain veth;"
	@echo "               eBPF datapath throughput with 1,000 policy rules vs none"
	@echo "  make bench-scale - control-plane scale: key propagation, apiserver requests, agent RSS (SCALE_NODES)"
	@echo "  make lint   - rustfmt check and clippy -D warnings"
	@echo "  make deps   - install Debian packages, build the testenv kube-apiserver, kubectl and helm"
	@echo "  make clients - kubectl and helm (built from the Go module proxy) into $(CLIENTS_DIR)"
	@echo "  make install-plugin - meshctl as the kubectl plugin $(CLIENTS_DIR)/kubectl-wiremesh"
	@echo "  make deploy-manifests - regenerate deploy/*.yaml from the Helm chart deploy/helm/wiremesh"
	@echo "  make image  - OCI image of mesh-agent (no registry, no Docker engine) into $(IMAGE_DIR)"
	@echo "  make crds   - regenerate deploy/crds/*.yaml"
	@echo "  make fuzz   - run every cargo-fuzz target for FUZZ_SECONDS each (default 60; docs/fuzzing.md)"

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

deps: apt-deps testenv clients sbom-tool

# cargo-cyclonedx (the CycloneDX project's cargo plugin) for the image's SBOM (`make image`, the
# deploy_image test), built once from crates.io into .cache/tools.
CYCLONEDX_VERSION := 0.5.9
SBOM_TOOL := .cache/tools/bin/cargo-cyclonedx
sbom-tool: $(SBOM_TOOL)

$(SBOM_TOOL):
	@echo "==> building cargo-cyclonedx $(CYCLONEDX_VERSION): the SBOM of the mesh-agent image; ~3 min once (~260 crates), then cached in .cache/tools"
	@$(CARGO) install --quiet --locked --version $(CYCLONEDX_VERSION) --root .cache/tools cargo-cyclonedx

NEED_GO = @command -v $(GO) >/dev/null || { echo "make $@: Go 1.26 is needed (no go in PATH)" >&2; exit 1; }

# The kube-apiserver + etcd test bed. Rebuilt only when its sources change; the first build downloads
# k8s.io/kubernetes and its dependencies and compiles them (minutes), later ones come from Go's cache.
testenv: $(TESTENV_BIN)

$(TESTENV_BIN): $(TESTENV_SRCS)
	$(NEED_GO)
	@hack/go-build.sh testenv "a real kube-apiserver + etcd linked from k8s.io/kubernetes, the test bed of every cluster test and the demo" \
		"~12 min on a fresh machine (~500 modules downloaded, ~2,000 packages compiled), ~1 min when only testenv's own code changed" \
		$(TESTENV_DIR) -- $(GO) build -buildvcs=false -o bin/testenv .

# Real clients for the tests, the docs and operators: kubectl of the same Kubernetes release as testenv
# (k8s.io/kubernetes/cmd/kubectl through testenv's module graph, so it reuses testenv's downloads and
# compiled packages) and helm v4 from its own module. /usr/bin/kubectl on a machine may be anything
# (e.g. a google-cloud-sdk dispatcher): nothing here uses it.
CLIENTS_DIR := .cache/bin
KUBECTL := $(CLIENTS_DIR)/kubectl
HELM := $(CLIENTS_DIR)/helm
HELM_VERSION := v4.3.2
KUBE_VERSION = $(shell sed -n 's|^[[:space:]]*k8s.io/kubernetes \(v[0-9.]*\)$$|\1|p' $(TESTENV_DIR)/go.mod)
KUBE_LDFLAGS = -s -w -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
	-X k8s.io/client-go/pkg/version.gitVersion=$(KUBE_VERSION)

clients: $(KUBECTL) $(HELM)

$(KUBECTL): $(TESTENV_DIR)/go.mod $(TESTENV_DIR)/go.sum
	$(NEED_GO)
	@mkdir -p $(CLIENTS_DIR)
	@hack/go-build.sh kubectl "kubectl $(KUBE_VERSION) for the deploy tests (apply -k, auth can-i, the kubectl-wiremesh plugin)" \
		"~2 min after testenv (shared Go cache), ~15 min on a fresh machine" \
		$(TESTENV_DIR) -- $(GO) build -buildvcs=false -ldflags="$(KUBE_LDFLAGS)" -o $(abspath $(KUBECTL)).tmp k8s.io/kubernetes/cmd/kubectl
	@mv $(KUBECTL).tmp $(KUBECTL)

# The stamp names the version: changing HELM_VERSION makes a newer stamp, so helm is rebuilt.
$(CLIENTS_DIR)/.helm-version-%:
	@mkdir -p $(CLIENTS_DIR)
	@touch $@

$(HELM): $(CLIENTS_DIR)/.helm-version-$(HELM_VERSION)
	$(NEED_GO)
	@GOBIN=$(abspath $(CLIENTS_DIR)) hack/go-build.sh helm "helm $(HELM_VERSION) for helm lint/template of deploy/helm/wiremesh" \
		"~3 min after testenv (shares most of the Kubernetes client packages), ~10 min on a fresh machine" \
		. -- $(GO) install -ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$(HELM_VERSION)" \
		helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)
	@touch $@

# meshctl as a kubectl plugin: kubectl finds `kubectl-wiremesh` on PATH (`kubectl wiremesh status`).
MESHCTL_BIN = $(abspath $(or $(CARGO_TARGET_DIR),target))/debug/meshctl
install-plugin:
	$(CARGO) build -p meshctl
	@mkdir -p $(CLIENTS_DIR)
	ln -sfn $(MESHCTL_BIN) $(CLIENTS_DIR)/kubectl-wiremesh
	@echo "installed $(CLIENTS_DIR)/kubectl-wiremesh -> $(MESHCTL_BIN); add $(abspath $(CLIENTS_DIR)) to PATH"

# The mesh-agent OCI image, built here without a registry or a Docker engine: Containerfile FROM
# scratch + the release binary and the glibc libraries it links, by buildah (Debian) with private vfs
# storage. Output: $(IMAGE_DIR)/oci (OCI layout, tag = version) and $(IMAGE_DIR)/mesh-agent-<version>.oci.tar
# (load it with `skopeo copy oci-archive:... docker://REGISTRY/...` or `ctr images import`).
IMAGE_DIR := .cache/image
IMAGE_VERSION = $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -1)
image:
	@if [ "$$(id -u)" != 0 ]; then echo "make image: needs root (buildah's storage)" >&2; exit 1; fi
	@command -v buildah >/dev/null || { echo "installing buildah (Debian package)"; apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah >/dev/null; }
	$(CARGO) build --release -p mesh-agent --bin mesh-agent
	hack/build-image.sh $(abspath $(or $(CARGO_TARGET_DIR),target))/release/mesh-agent $(IMAGE_DIR) $(IMAGE_VERSION)

# deploy/ is generated from the Helm chart (the one source of truth); a test fails when they drift.
deploy-manifests: $(HELM)
	hack/render-deploy.sh $(HELM)

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
DEMO_REPORT_DIR ?= /tmp/wiremesh-demo-report
MESHCTL = $(or $(CARGO_TARGET_DIR),target)/debug/meshctl

demo: deps
	@if [ "$$(id -u)" != 0 ]; then echo "make demo: needs root (network namespaces, TUN devices)" >&2; exit 1; fi
	@echo "==> building mesh-agent, meshctl and the process supervisor of the virtual cluster"
	$(CARGO) build -p mesh-agent -p meshctl -p wiremesh-integration --bins
	@echo
	@echo "==> meshctl demo up --nodes $(DEMO_NODES) --pods-per-node $(DEMO_PODS_PER_NODE)"
	@$(MESHCTL) demo up --nodes $(DEMO_NODES) --pods-per-node $(DEMO_PODS_PER_NODE)
	@status=0; \
	echo; echo "==> cross-node pod traffic through the WireGuard mesh (ping, TCP echo, UDP echo)"; \
	$(MESHCTL) demo traffic || status=1; \
	echo; echo "==> eBPF flow records of each agent (/flows)"; \
	$(MESHCTL) demo flows || status=1; \
	echo; echo "==> key rotation of every node under traffic (meshctl rotate, 10 ms ping + TCP stream)"; \
	$(MESHCTL) demo rotate || status=1; \
	echo; echo "==> meshctl status"; \
	$(MESHCTL) status --kubeconfig "$$($(MESHCTL) demo kubeconfig)" || status=1; \
	echo; echo "==> meshctl report of the demo's own traffic"; \
	rm -rf "$(DEMO_REPORT_DIR)"; \
	$(MESHCTL) report --kubeconfig "$$($(MESHCTL) demo kubeconfig)" --since 30m --out "$(DEMO_REPORT_DIR)" || status=1; \
	echo; echo "==> meshctl demo down"; \
	$(MESHCTL) demo down || status=1; \
	echo; echo "==> compliance report: $(DEMO_REPORT_DIR)/report.json (and report.html)"; \
	$(MESHCTL) report verify "$(DEMO_REPORT_DIR)/report.json" --key "$(DEMO_REPORT_DIR)/report.pub" || status=1; \
	sed -n 's/^ *"coveragePercent": "\(.*\)",*$$/    coverage \1 of cross-node pod flows encrypted/p' "$(DEMO_REPORT_DIR)/report.json"; \
	if [ $$status = 0 ]; then echo "==> demo passed"; else echo "==> demo FAILED" >&2; fi; \
	exit $$status

# Benchmarks (root): veth vs wireguard-go vs boringtun-cli vs our engine; eBPF datapath with no
# policy vs ~1,000 rules (variant `policy`, bpf/examples/datapath-bench).
# BENCH_ARGS are passed to bench/bench.py (e.g. BENCH_ARGS="--runs 5 --time 10").
BENCH_TOOLS := bench/.tools
BORINGTUN_CLI := $(BENCH_TOOLS)/bin/boringtun-cli
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release -p mesh-agent --bin mesh-agent
	$(CARGO) build --release -p wiremesh-device --example engine-floor
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
	$(MAKE) bench-scale

# Control-plane scale (root): one real agent + SCALE_NODES synthetic Nodes with pods and as many
# simulated agents (the agent's own watch code, one process), docs/benchmarks.md. Debug build, like
# the virtual cluster's binaries. SCALE_ARGS e.g. "--agents 500 --pods-per-node 10 --steady-secs 60".
SCALE_NODES ?= 100 1000
SCALE_ARGS ?=
bench-scale: deps
	$(CARGO) build -p mesh-agent -p meshctl -p wiremesh-integration --bins
	$(CARGO) build -p wiremesh-integration --example scale_bench
	@for n in $(SCALE_NODES); do \
		echo "==> scale_bench --nodes $$n $(SCALE_ARGS)"; \
		"$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/examples/scale_bench" --nodes $$n $(SCALE_ARGS); \
	done

FUZZ_SECONDS ?= 60
# Every cargo-fuzz target as <crate dir>:<target> (docs/fuzzing.md). `make fuzz` runs each for
# FUZZ_SECONDS; FUZZ_TARGETS="device:engine_packets" runs one. New inputs go to .cache/fuzz/<target>;
# the committed seeds are in <crate>/fuzz/corpus/<target>, replayed by each crate's tests.
FUZZ_TARGETS ?= keyexchange:annotations wgctrl:uapi_set wgctrl:uapi_get device:uapi_server \
	device:engine_packets crds:specs mesh-agent:flows_query
FUZZ_MAX_LEN ?= 4096
# cargo-fuzz needs nightly rustc features; without a nightly toolchain, stable with RUSTC_BOOTSTRAP=1.
cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz

fuzz: cargo-fuzz
	@if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then tc=+nightly; boot=; else tc=; boot=1; fi; \
	failed=""; \
	for t in $(FUZZ_TARGETS); do \
		dir=$${t%%:*}; target=$${t#*:}; \
		mkdir -p .cache/fuzz/$$target; \
		echo "==> fuzz $$dir/fuzz $$target for $(FUZZ_SECONDS) s"; \
		( cd $$dir && RUSTC_BOOTSTRAP=$$boot $(CARGO) $$tc fuzz run $$target ../.cache/fuzz/$$target fuzz/corpus/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) ) || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "make fuzz: findings in:$$failed (see <crate>/fuzz/artifacts/)" >&2; exit 1; fi

clean:
	$(CARGO) clean
	rm -rf $(TESTENV_DIR)/bin $(CLIENTS_DIR)
