# volumed: `make run` starts the daemon on embedded defaults with the
# CloudStack simulator; `make test` runs every test.
GO ?= go
export PATH := $(PATH):/usr/local/go/bin
PKGS := ./...
TEST_TIMEOUT ?= 45m

.PHONY: run test bench build lint cloudsim clean

run:
	$(GO) run ./cmd/volumed --sim

cloudsim:
	$(GO) run ./cmd/cloudsim

build:
	$(GO) build -o bin/ ./cmd/...

lint:
	@out=$$(gofmt -l . | grep -v '^vendor/'); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

test: lint
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) $(PKGS)

bench:
	$(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 30m $(PKGS)

clean:
	rm -rf bin volumed-data
