# vnetbpf — run `make help` for the targets.
SHELL := /bin/bash
GO ?= go
export PATH := /usr/local/go/bin:$(PATH)

BIN := bin
BPF_SRC := $(wildcard bpf/*.c bpf/*.h bpf/include/*.h)
GENERATED := pkg/loader/datapath_bpfel.go pkg/loader/datapath_bpfel.o
# Packages apt must provide. clang-19/llvm-19 rebuild the BPF objects; the rest serve tests.
APT_PACKAGES := clang-19 llvm-19 libbpf-dev bpftool iproute2 nftables iputils-ping containerd runc
TEST_FLAGS ?= -count=1 -timeout 15m

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: build
build: ## Build bin/vnetbpf-agent and bin/vnetbpf (no clang needed: generated objects are committed)
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/vnetbpf-agent ./cmd/agent
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/vnetbpf ./cmd/cni

.PHONY: demo
demo: deps ## Run vnetbpf on a simulated VNet: a node, its agent, four containers, a measured connectivity matrix. Needs root
	$(GO) run ./test/e2e/demo

.PHONY: demo-down
demo-down: ## Remove what an interrupted demo left behind. Needs root
	$(GO) run ./test/e2e/demo -down

.PHONY: deps
deps: ## Install what builds and tests need (apt packages; mounts bpffs). Needs root
	@scripts/deps.sh $(APT_PACKAGES)

.PHONY: generate
generate: ## Rebuild the BPF objects and their Go bindings with bpf2go and clang-19
	@command -v clang-19 >/dev/null || { echo "clang-19 is missing: run 'make deps' (as root)"; exit 1; }
	cd pkg/loader && $(GO) generate ./...

.PHONY: verify-generated
verify-generated: ## Fail if the committed BPF objects differ from a fresh build
	@scripts/verify-generated.sh $(GENERATED)

.PHONY: test
test: deps verify-generated ## Run every test: unit, BPF (prog.Run) and namespace integration tests. Needs root
	$(GO) test $(TEST_FLAGS) ./...

.PHONY: e2e-cri
e2e-cri: deps ## Pods through a real containerd and crictl (the CRI calls kubelet makes), wired by vnetbpf. Needs root
	$(GO) test -count=1 -v -timeout 10m ./test/e2e/cri/...

BENCH_APT := iperf3 qperf

.PHONY: bench
bench: ## Measure vnetbpf against ptp, bridge and a bare veth pair: one table, raw JSON in out/bench (about 8 min; BENCH_QUICK=1: about 2). Needs root
	@scripts/deps.sh $(APT_PACKAGES) $(BENCH_APT)
	$(GO) run ./bench/cmd/vnetbpf-bench $(if $(filter 1 true,$(BENCH_QUICK)),--quick)

.PHONY: bench-profile
bench-profile: ## Where each datapath branch and each mode's transaction spends its time (perf). Needs root
	@scripts/deps.sh $(APT_PACKAGES) $(BENCH_APT) linux-perf
	$(GO) run ./bench/cmd/vnetbpf-bench profile
	$(GO) run ./bench/cmd/vnetbpf-bench profile-datapath

.PHONY: test-load
test-load: deps ## 250 containers on one node pinging for 60 s with an agent restart half way (about 2 min). Needs root
	VNETBPF_LOAD=1 $(GO) test -count=1 -timeout 20m -run TestLoad -v ./test/e2e

.PHONY: test-unit
test-unit: ## Run the tests that need neither root nor a kernel feature
	$(GO) test -count=1 -short ./pkg/api/... ./pkg/ipam/...

.PHONY: lint
lint: ## gofmt and go vet
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

.PHONY: clean
clean: ## Remove build output
	rm -rf $(BIN)
