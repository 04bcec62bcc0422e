# keyway: the two commands a new user needs are `make demo` and `make test`.
# Every target installs what it needs first (Rust target, Debian and Python packages).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
export CARGO_TERM_COLOR ?= never

.PHONY: help setup check test test-policy conformance wasm e2e bench fuzz demo clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install the Rust toolchain pieces the build needs (wasm target, rustfmt, clippy)
	@./scripts/setup.sh

check: setup ## fmt, clippy for the host and for keyway-policy on wasm32-wasip1, warnings are errors
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p keyway-policy --target $(WASM_TARGET) --no-default-features --locked -- -D warnings

test: setup wasm ## every test layer: unit, property, conformance, command line, the filter in real Envoy; keyway-policy for wasm
	$(CARGO) build -p keyway-policy --target $(WASM_TARGET) --no-default-features --locked
	KEYWAY_ENVOY="$$(./scripts/install-envoy.sh)" $(CARGO) test --workspace --locked

conformance: setup ## only the golden-data conformance suites, with the pass counts
	$(CARGO) test -p keyway-policy --test conformance --locked -- --nocapture

wasm: setup ## the proxy-wasm filter module: target/wasm32-wasip1/wasm-release/keyway_filter.wasm
	$(CARGO) build -p keyway-filter --target $(WASM_TARGET) --profile wasm-release --locked
	@stat -c '%n: %s bytes' target/$(WASM_TARGET)/wasm-release/keyway_filter.wasm

e2e: ## end-to-end tests in network namespaces (lands with the end-to-end issue)
	@echo "make e2e: the end-to-end harness is not written yet (issue #8); nothing to run" >&2; exit 1

demo: ## the multi-zone demo (lands with the end-to-end issue)
	@echo "make demo: the multi-zone demo needs the filter, the gateway and the e2e harness (issues #3, #4, #8); not written yet" >&2; exit 1

bench: setup ## benchmarks: policy decision latency and compile time (results in target/bench-policy.json)
	$(CARGO) bench -p keyway-policy --bench scale --locked
	$(CARGO) bench -p keyway-policy --bench decide --locked

fuzz: setup ## run each decoder fuzz target for FUZZ_SECONDS (default 60) on the committed corpus
	./scripts/fuzz.sh $${FUZZ_SECONDS:-60}

clean: ## remove build output
	$(CARGO) clean
