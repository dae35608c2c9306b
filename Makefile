# The two commands a user needs: `make devnet` and `make test`.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=RelWithDebInfo

.PHONY: deps build test devnet bench clean

deps:
	@bash scripts/install-deps

build: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@bash scripts/run-tests $(BUILD_DIR)

devnet: build
	@$(BUILD_DIR)/solvernet devnet --summary-json $(BUILD_DIR)/devnet-summary.json

bench: build
	@bash scripts/run-benches $(BUILD_DIR)

clean:
	rm -rf $(BUILD_DIR)
