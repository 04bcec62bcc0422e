# keyway: the two commands a new user needs are `make demo` and `make test`.
# Every target installs what it needs first (Rust target, Debian and Python packages).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
export CARGO_TERM_COLOR ?= never
# Where cargo builds (honours CARGO_TARGET_DIR), and the filter module the tests and tools load.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
export KEYWAY_WASM ?= $(abspath $(TARGET_DIR))/wasm32-wasip1/wasm-release/keyway_filter.wasm

.PHONY: help setup check test manifests istio-xds conformance wasm e2e e2e-istio bench fuzz demo clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install the Rust toolchain pieces the build needs (wasm target, rustfmt, clippy)
	@./scripts/setup.sh

check: setup ## fmt, clippy (host, the gateway with kubernetes, wasm32-wasip1; warnings are errors, at most six arguments), no module import cycles
	$(CARGO) fmt --all --check
	python3 scripts/modcycles.py policy/src gateway/src filter/src e2e/src bench/src istio-check/src
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p keyway-gateway --features kubernetes --all-targets --locked -- -D warnings
	$(CARGO) clippy -p keyway-policy --target $(WASM_TARGET) --no-default-features --locked -- -D warnings
	$(CARGO) clippy -p keyway-filter --target $(WASM_TARGET) --locked -- -D warnings

test: setup wasm istio-xds ## every test layer: unit, property, conformance, command line, gateways, the filter in real Envoy, end to end on Istio's generated sidecar configuration (root)
	./scripts/install-deps.sh
	$(CARGO) build -p keyway-policy --target $(WASM_TARGET) --no-default-features --locked
	KEYWAY_SIDECAR=istio KEYWAY_XDS_DUMP="$(abspath $(XDS_DUMP))/$(XDS_PIN)" KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) test --workspace --locked
	$(CARGO) test -p keyway-gateway --features kubernetes --locked --lib kube_source

manifests: setup ## istio/ rendered with kustomize and validated with samples/ against testdata/schemas; the EnvoyFilters held to the e2e sidecar
	KEYWAY_KUBECTL="$$(./scripts/install-kubectl.sh)" $(CARGO) test -p keyway-istio-check --locked

istio-xds: ## Istio's own pilot, at each pinned release, generates the sample sidecars' LDS/CDS/ECDS from istio/ and the harness judges them, dumping them for the e2e bed into XDS_DUMP (Go; fresh machine ~23 min, 11 per pin, then ~1 min)
	@go=$$(command -v go || echo /usr/local/go/bin/go); [ -x "$$go" ] || { echo "make istio-xds: needs Go (istio-check/xds/go.mod names the version)" >&2; exit 2; }; \
	cd istio-check/xds && export KEYWAY_KUBECTL="$$(../../scripts/install-kubectl.sh)" PATH="$$(dirname "$$go"):$$PATH" KEYWAY_XDS_DUMP="$(abspath $(XDS_DUMP))" && \
	for mod in go.mod $$(ls releases/*.mod 2>/dev/null); do \
		echo "istio-xds: $$mod"; GOFLAGS="$${GOFLAGS:-} -modfile=$$mod" go test -count=1 ./...; \
	done; \
	if [ "$${KEYWAY_GO_CLEAN:-0}" = 1 ]; then echo "istio-xds: KEYWAY_GO_CLEAN=1, removing Go's build and module caches"; go clean -cache -modcache; fi

conformance: setup ## only the golden-data conformance suites, with the pass counts
	$(CARGO) test -p keyway-policy --test conformance --locked -- --nocapture

wasm: setup ## the proxy-wasm filter module: <target dir>/wasm32-wasip1/wasm-release/keyway_filter.wasm (and examples/empty_filter.wasm, the filter bench's baseline)
	$(CARGO) build -p keyway-filter --target $(WASM_TARGET) --profile wasm-release --locked --lib --example empty_filter
	@stat -c '%n: %s bytes' $(TARGET_DIR)/$(WASM_TARGET)/wasm-release/keyway_filter.wasm $(TARGET_DIR)/$(WASM_TARGET)/wasm-release/examples/empty_filter.wasm

e2e: setup wasm ## end-to-end tests only: zones as network namespaces, real gateways and Envoy sidecars (root)
	./scripts/install-deps.sh
	$(CARGO) build -p keyway-gateway -p keyway-e2e --locked
	KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) test -p keyway-e2e --locked -- --nocapture

# The pin whose generated configuration the e2e sidecars run on (make test, make e2e-istio): the
# newest; make istio-xds dumps every pin's into XDS_DUMP.
XDS_PIN_MOD ?= go.mod
XDS_PIN ?= release-1.31-20260827
XDS_DUMP ?= $(or $(KEYWAY_XDS_DUMP),$(TARGET_DIR)/xds-dump)

e2e-istio: setup wasm ## the end-to-end suite with every sidecar on what Istio's own pilot generates (newest pin, istio-check/xds dump converted by e2e/src/envoy/istio.rs; root, Go)
	@go=$$(command -v go || echo /usr/local/go/bin/go); [ -x "$$go" ] || { echo "make e2e-istio: needs Go (istio-check/xds/go.mod names the version)" >&2; exit 2; }; \
	cd istio-check/xds && export KEYWAY_KUBECTL="$$(../../scripts/install-kubectl.sh)" PATH="$$(dirname "$$go"):$$PATH" && \
	KEYWAY_XDS_DUMP="$(abspath $(XDS_DUMP))" GOFLAGS="$${GOFLAGS:-} -modfile=$(XDS_PIN_MOD)" go test -count=1 -run TestEveryReferencedExtensionIsServedWithAnAcceptedType ./...
	./scripts/install-deps.sh
	$(CARGO) build -p keyway-gateway -p keyway-e2e --locked
	KEYWAY_SIDECAR=istio KEYWAY_XDS_DUMP="$(abspath $(XDS_DUMP))/$(XDS_PIN)" KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) test -p keyway-e2e --locked -- --nocapture

demo: setup wasm ## the demo: a three-zone overlay from samples/shop, the traffic matrix, metrics, access logs (root)
	@if [ "$$(id -u)" != 0 ]; then echo "make demo: builds network namespaces and iptables rules, so it must run as root (sudo make demo)" >&2; exit 2; fi
	./scripts/install-deps.sh
	$(CARGO) build -p keyway-gateway -p keyway-e2e --locked
	KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(TARGET_DIR)/debug/keyway-e2e demo

bench: setup wasm ## benchmarks: policy engine, filter in Envoy, then the data path side by side (root; results in bench/results/)
	@if [ "$$(id -u)" != 0 ]; then echo "make bench: the data-path benchmarks build network namespaces, so it must run as root (sudo make bench)" >&2; exit 2; fi
	./scripts/install-deps.sh
	command -v iperf3 >/dev/null && command -v wg >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 wireguard-tools; }
	command -v boringtun-cli >/dev/null || [ -x "$$HOME/.cargo/bin/boringtun-cli" ] || $(CARGO) install boringtun-cli --version 0.7.1 --locked
	$(CARGO) bench -p keyway-policy --bench scale --locked
	$(CARGO) bench -p keyway-policy --bench decide --locked
	KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) bench -p keyway-filter --bench connections --locked
	rm -f $(TARGET_DIR)/bench-failover.json
	KEYWAY_FAILOVER_OUT="$(abspath $(TARGET_DIR))/bench-failover.json" KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) test -p keyway-e2e --test e2e --locked -- failover --nocapture
	$(CARGO) build --release -p keyway-gateway -p keyway-e2e -p keyway-bench --locked
	KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(TARGET_DIR)/release/keyway-bench run --out bench/results

fuzz: setup ## run each decoder fuzz target for FUZZ_SECONDS (default 60) on the committed corpus
	./scripts/fuzz.sh $${FUZZ_SECONDS:-60}

clean: ## remove build output
	$(CARGO) clean
