# propeller-operator — see README.md.
SHELL := /bin/bash
CARGO ?= cargo
TESTBED_DIR ?= .testbed

.PHONY: all build test lint fl-client demo-fl demo-multicluster fuzz chaos provision cluster-up cluster-down crds demo dev-up dev-down clean images bench

all: build

build:
	$(CARGO) build --all-targets

## Installs the Debian packages and builds the local control plane (cached outside the repository).
provision:
	@bash e2e/provision.sh >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## Unit, integration and e2e tests on a real kube-apiserver, etcd, kube-controller-manager and mosquitto.
## With E2E_KUBECONFIG=path they run against that cluster instead of a local one.
## The 2,000-task kill test (skipped in the first run) runs alone afterwards: it needs both cores.
HEAVY_TEST := sharding::killing_the_leader_and_a_shard_under_load_loses_and_repeats_no_task
test: provision lint fl-client
	$(CARGO) test --no-fail-fast --all-targets -- --test-threads=2 --skip $(HEAVY_TEST)
	$(CARGO) test --test e2e -- --exact $(HEAVY_TEST)

## The example FL client (examples/fl-client/fl_client.c) as a WASI command, with Debian's clang and wasi-libc.
FL_CLIENT := target/wasm32-wasi/fl-client.wasm
fl-client: $(FL_CLIENT)
$(FL_CLIENT): examples/fl-client/fl_client.c | provision
	@mkdir -p $(dir $@)
	clang-14 --target=wasm32-wasi -Os -Wall -Wextra -Werror -Wl,--strip-all -o $@ $<

cluster-up: provision
	$(CARGO) run --quiet --bin testbed -- --dir $(TESTBED_DIR) up
	@echo "source it with: set -a; . $(TESTBED_DIR)/env; set +a"

cluster-down:
	@if [ -f $(TESTBED_DIR)/pids ]; then $(CARGO) run --quiet --bin testbed -- --dir $(TESTBED_DIR) down; \
	 else echo "testbed: nothing running"; fi

## The walkthrough: an addition Task answered "42" (local cluster, embedded broker, simulated proplet).
demo: provision
	$(CARGO) build --quiet --bins
	bash e2e/demo.sh

## Federated learning: 3 rounds over 3 simulated proplets running the example FL client; the loss must fall.
demo-fl: provision fl-client
	$(CARGO) build --quiet --bins
	bash e2e/demo-fl.sh

## Every parser of outside input fuzzed with 1,000,000 inputs per target (release mode, a few minutes; no
## cluster needed). `make test` runs a short pass of the same targets.
fuzz:
	FUZZ_CASES=1000000 $(CARGO) test --release --test fuzz -- --nocapture

## Faults at random under load: 5,000 tasks over 200 proplets on 3 shards and an FL experiment, while replicas
## are killed, mosquitto restarts, the API server stops and one replica is cut from the broker (a network
## namespace: needs root); bounded (about 12 min at most); the invariants in bench/results/chaos.json.
chaos: provision fl-client
	$(CARGO) build --release --bins
	target/release/bench --chaos

## Hierarchical FL across three local clusters (a hub and two members), 2 rounds; prints the global model.
demo-multicluster: provision fl-client
	$(CARGO) build --quiet --bins
	bash e2e/demo-multicluster.sh

## Cluster + broker + CRDs + operator + PROPLETS simulated proplets (default 3), left running.
dev-up: provision fl-client
	$(CARGO) build --quiet --bins
	bash e2e/dev.sh up

dev-down:
	bash e2e/dev.sh down

## Regenerates crds/ from the Rust types in src/api/ (a test fails when they differ).
crds:
	$(CARGO) run --quiet --bin crdgen -- --out crds

clean: cluster-down
	$(CARGO) clean

## Container images (operator and Wasm runner) where docker or podman exists; see images/Dockerfile.
ENGINE ?= $(shell command -v docker || command -v podman)
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
images:
	@test -n "$(ENGINE)" || { echo "images: no docker or podman on this machine"; exit 1; }
	$(ENGINE) build -f images/Dockerfile --target operator -t propeller-operator:$(VERSION) .
	$(ENGINE) build -f images/Dockerfile --target wasm-runner -t ghcr.io/absmach/propeller-operator/wasm-runner:$(VERSION) .

## Benchmarks (release build; about an hour, the sharding scenarios half of it): bench/results/latest.json and docs/benchmarks.md.
bench: provision
	$(CARGO) build --release --bins
	$(CARGO) run --release --quiet --bin bench
