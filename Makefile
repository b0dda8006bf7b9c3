# volumed: `make run` starts the daemon on embedded defaults against the
# CloudStack simulator; `make test` runs every test.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin
PKGS := ./...
TEST_TIMEOUT ?= 45m

# What the tests use besides Go: redis-server, and the NBD clients
# (nbdinfo and nbdcopy from libnbd-bin; nbdsh from python3-libnbd; qemu-img,
# qemu-io and, for bench-nbd, qemu-nbd from qemu-utils), systemd-analyze
# (systemd) for the units, ip (iproute2) and tcpdump for the TLS test off
# loopback (a network namespace, a veth pair and a capture on it), and
# mkfs.ext4 (e2fsprogs) for a mounted volume.
TEST_TOOLS := redis-server nbdinfo nbdcopy nbdsh qemu-img qemu-io qemu-nbd systemd-analyze ip tcpdump mkfs.ext4
TEST_PACKAGES := redis-server libnbd-bin python3-libnbd qemu-utils systemd iproute2 tcpdump e2fsprogs

# make install: the binaries, the systemd units, the README and docs/; DESTDIR
# stages it (packaging), PREFIX moves it (the units follow).
PREFIX ?= /usr/local
SYSTEMD_DIR ?= /etc/systemd/system
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS := -X github.com/volumed/volumed/internal/version.Version=$(VERSION)

.PHONY: run test chaos bench bench-nbd bench-scale bench-ops bench-inventory build install lint deps deps-apt deps-npm cloudsim clean

# run builds volumed and the CloudStack simulator (test/cloudsim/cmd/cloudsim)
# into bin/, then scripts/run.sh starts the simulator in the background and
# volumed in the foreground against it; Ctrl-C stops both.
run:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/volumed ./test/cloudsim/cmd/cloudsim
	bash scripts/run.sh

cloudsim:
	$(GO) run ./test/cloudsim/cmd/cloudsim

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

install: build
	install -D -m 0755 bin/volumed $(DESTDIR)$(PREFIX)/bin/volumed
	install -D -m 0755 bin/volctl $(DESTDIR)$(PREFIX)/bin/volctl
	install -d -m 0755 $(DESTDIR)$(SYSTEMD_DIR)
	for u in volumed volumed-agent; do \
		sed 's#/usr/local/#$(PREFIX)/#g' deploy/systemd/$$u.service > $(DESTDIR)$(SYSTEMD_DIR)/$$u.service && \
		chmod 0644 $(DESTDIR)$(SYSTEMD_DIR)/$$u.service || exit 1; \
	done
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/volumed/README.md
	install -d -m 0755 $(DESTDIR)$(PREFIX)/share/doc/volumed/docs
	install -m 0644 docs/*.md $(DESTDIR)$(PREFIX)/share/doc/volumed/docs/
	install -d -m 0750 $(DESTDIR)/etc/volumed
	@echo "installed; settings in /etc/volumed/volumed.env (agent: /etc/volumed/agent.env), then: systemctl daemon-reload && systemctl enable --now volumed"

lint:
	@out=$$(gofmt -l . | grep -v '^vendor/'); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

# The OpenAPI validators the tests run (npm, pinned in tools/openapi).
OPENAPI_TOOLS := tools/openapi/node_modules/.bin

# deps installs the test tools with apt-get when they are missing and this
# is root on Debian, and the npm validators into tools/openapi/node_modules;
# elsewhere the tests that need them skip (fail when CI=true).
deps: deps-apt deps-npm

deps-apt:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_PACKAGES) >/dev/null; \
		else echo "missing$$missing: the tests that need them will skip (install: $(TEST_PACKAGES))"; fi; \
	fi

deps-npm:
	@if [ ! -x $(OPENAPI_TOOLS)/swagger-cli ] || [ ! -x $(OPENAPI_TOOLS)/redocly ]; then \
		if ! command -v npm >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing npm"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; \
		fi; \
		if command -v npm >/dev/null 2>&1; then \
			echo "installing the OpenAPI validators (npm ci --prefix tools/openapi)"; \
			npm ci --prefix tools/openapi --no-audit --no-fund --loglevel=error; \
		else echo "npm missing: the OpenAPI lint test will skip (install: nodejs npm)"; fi; \
	fi

test: lint deps
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

# chaos runs only the chaos soak (test/e2e TestChaos) for SECONDS of faults
# (default 600), its SIGSTOPs outlasting the ack-wait; SEED replays a run
# (default: a new one, printed). make test runs a short one.
SECONDS ?= 600
SEED ?=
chaos:
	CHAOS_SECONDS=$(SECONDS) CHAOS_SEED=$(SEED) $(GO) test -race -count=1 -timeout $$(( $(SECONDS) + 1200 ))s \
		-run '^TestChaos$$' -v ./test/e2e/

# bench runs bench-nbd (volumed's NBD server beside qemu-nbd), every Go
# benchmark, then bench/accept.sh: POST /volumes with vegeta against
# volumed (embedded store, Redis) and a bare chi handler.
bench: bench-nbd
	$(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 30m $(PKGS)
	bash bench/accept.sh

# bench-scale records N terminal operations (default 1,000,000, over
# 10,000 volumes and 1,000 VMs) through the state store interface, then
# measures a real volumed on that history (bench/scale): listings, reads,
# counts, resident memory, start and restart, each beside its goal
# (docs/scale.md). The embedded store, then Redis when redis-server is
# installed. `make bench-scale N=100000` for a shorter run.
N ?= 1000000
bench-scale:
	bash bench/scale.sh $(N)

# bench-ops measures volumed's CPU per operation and latency on the mixed
# workload (8 clients, create -> attach -> detach -> delete, 20 ms
# simulator jobs, embedded store), for BASE (default main) and this tree
# side by side (bench/ops.sh; PROFILE=dir keeps CPU profiles).
bench-ops:
	bash bench/ops.sh

# bench-inventory measures a force-sync, the periodic reconcile and the
# pre-check cache's refresh with 1,000 volumes / 100 VMs and 10,000 / 1,000
# in the simulator (SIZES=...), for BASE (default main) and this tree
# (bench/inventory.sh).
bench-inventory:
	bash bench/inventory.sh

# bench-nbd runs volumed's NBD server and qemu-nbd side by side on one loop
# device (root and the NBD clients needed; skipped with a message otherwise).
bench-nbd:
	@if [ "$$(id -u)" = 0 ] && command -v qemu-nbd >/dev/null && command -v nbdcopy >/dev/null; then \
		bench/nbd-vs-qemu.sh; \
	else echo "bench-nbd: skipped (needs root, qemu-nbd and nbdcopy; make deps)"; fi

clean:
	rm -rf bin volumed-data
