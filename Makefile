# volumed: `make run` starts the daemon on embedded defaults with the
# CloudStack simulator; `make test` runs every test.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin
PKGS := ./...
TEST_TIMEOUT ?= 45m

# What the tests use besides Go: redis-server, and the NBD clients
# (nbdinfo and nbdcopy from libnbd-bin; nbdsh from python3-libnbd; qemu-img,
# qemu-io and, for bench-nbd, qemu-nbd from qemu-utils).
TEST_TOOLS := redis-server nbdinfo nbdcopy nbdsh qemu-img qemu-io qemu-nbd
TEST_PACKAGES := redis-server libnbd-bin python3-libnbd qemu-utils

.PHONY: run test bench bench-nbd build lint deps cloudsim clean

run:
	$(GO) run ./cmd/volumed --sim

cloudsim:
	$(GO) run ./cmd/cloudsim

build:
	$(GO) build -o bin/ ./cmd/...

lint:
	@out=$$(gofmt -l . | grep -v '^vendor/'); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

# deps installs the test tools with apt-get when they are missing and this
# is root on Debian; elsewhere the tests that need them skip (fail when CI=true).
deps:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; \
		else echo "missing$$missing: the tests that need them will skip (install: $(TEST_PACKAGES))"; fi; \
	fi

test: lint deps
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# bench runs bench-nbd (volumed's NBD server beside qemu-nbd), every Go
# benchmark, then bench/accept.sh: POST /volumes with vegeta against
# volumed (embedded store, Redis) and a bare chi handler.
bench: bench-nbd
	$(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 30m $(PKGS)
	bash bench/accept.sh

# bench-nbd runs volumed's NBD server and qemu-nbd side by side on one loop
# device (root and the NBD clients needed; skipped with a message otherwise).
bench-nbd:
	@if [ "$$(id -u)" = 0 ] && command -v qemu-nbd >/dev/null && command -v nbdcopy >/dev/null; then \
		bench/nbd-vs-qemu.sh; \
	else echo "bench-nbd: skipped (needs root, qemu-nbd and nbdcopy; make deps)"; fi

clean:
	rm -rf bin volumed-data
