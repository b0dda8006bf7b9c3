#!/usr/bin/env bash
# bench/accept.sh measures POST /volumes through volumed, with the embedded
# store and with Redis, side by side in the same run with a bare chi
# handler that decodes and validates the same body (bench/barechi), using
# vegeta with WORKERS workers (default 16) at full speed for DURATION
# (default 5s) each, after a 1 s warm-up. Each volumed run has a CloudStack
# simulator of its own (test/cloudsim/cmd/cloudsim) beside it, driven
# through its control endpoint. In the "held" lines the simulator answers
# createVolume only after an hour, so the executor holds its 64 creates and
# the figure is the front door's; in the "executing" line the creates run
# (50 ms jobs) while the front door is measured.
# Each target runs right after a bare chi run, so that both see the same
# load; it prints the machine, its load, and one line per run with the
# ratio to the bare chi run before it. Needs Go, curl, python3 and, for the
# Redis line, redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
WORKERS=${WORKERS:-16}
LOG_LEVEL=${LOG_LEVEL:-warn}
VEGETA=github.com/tsenart/vegeta/v12@v12.13.0

work=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done # volumed stops within its shutdown
	rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

go build -o "$work/volumed" ./cmd/volumed
go build -o "$work/cloudsim" ./test/cloudsim/cmd/cloudsim
go build -o "$work/barechi" ./bench/barechi
GOBIN="$work" go install "$VEGETA"

wait_http() { # url
	for _ in $(seq 300); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
	echo "no answer from $1" >&2; return 1
}

# attack NAME URL: prints "NAME rate p50 p99 success"
attack() {
	local name=$1 url=$2
	printf 'POST %s\nContent-Type: application/json\n@%s\n' "$url" "$PWD/bench/testdata/create.json" >"$work/targets"
	"$work/vegeta" attack -rate=0 -workers="$WORKERS" -max-workers="$WORKERS" -duration=1s -targets="$work/targets" >/dev/null
	"$work/vegeta" attack -rate=0 -workers="$WORKERS" -max-workers="$WORKERS" -duration="$DURATION" -targets="$work/targets" \
		| "$work/vegeta" report -type=json >"$work/$name.json"
	python3 - "$name" "$work/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
codes = ",".join(f"{k}:{v}" for k, v in sorted(r["status_codes"].items()))
print(f'{sys.argv[1]} {r["throughput"]:.0f} {r["latencies"]["50th"]/1e6:.2f} {r["latencies"]["99th"]/1e6:.2f} {r["success"]:.4f} {codes}')
PY
}

# stop PID: stops a process and waits for it.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# volumed_up NAME [extra flags]: starts a simulator, then volumed against it
# (as the simulator's appliance VM); API is volumed's API base, SIM the
# simulator's control endpoint.
volumed_up() {
	local name=$1; shift
	local api nats sim
	api=$(port); nats=$(port); sim=$(port)
	mkdir -p "$work/$name"
	"$work/cloudsim" --listen "127.0.0.1:$sim" --state-dir "$work/$name/cloudsim" --log-level "$LOG_LEVEL" \
		>"$work/$name-cloudsim.log" 2>&1 &
	sim_pid=$!
	pids+=("$sim_pid")
	SIM="http://127.0.0.1:$sim/_sim"
	wait_http "$SIM/stats"
	printf 'listen: 127.0.0.1:%s\njetstream {}\n' "$nats" >"$work/$name/nats.conf"
	"$work/volumed" --cloudstack-url "http://127.0.0.1:$sim/client/api" --cloudstack-api-key cloudsim-api-key \
		--cloudstack-secret-key cloudsim-secret-key --vm-id 87654321-4321-4321-4321-210987654321 \
		--listen "127.0.0.1:$api" --data-dir "$work/$name" \
		--nats-config "$work/$name/nats.conf" --nbd-listen "" --device-agent=false --log-level "$LOG_LEVEL" "$@" \
		>"$work/$name.log" 2>&1 &
	volumed_pid=$!
	pids+=("$volumed_pid")
	API="http://127.0.0.1:$api/api/v1"
	wait_http "$API/health"
}

# volumed_down stops the volumed started last, then its simulator.
volumed_down() { stop "$volumed_pid"; stop "$sim_pid"; }

# faults JSON: replaces the simulator's faults.
faults() { curl -fs -X PUT "$SIM/faults" -d "$1" >/dev/null; }
held='{"latency":{"createVolume":"1h"}}'

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "vegeta $VEGETA, $WORKERS workers, $DURATION per target, volumed --log-level $LOG_LEVEL"

chi=$(port)
"$work/barechi" --listen "127.0.0.1:$chi" &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$chi/" && break; sleep 0.1; done

# pair NAME URL: bare chi, then the target, back to back, so that both
# see the same load; the ratio is the target's to that bare chi's.
results=()
pair() {
	results+=("$(attack bare-chi "http://127.0.0.1:$chi/api/v1/volumes")")
	results+=("$(attack "$1" "$2")")
}
volumed_up embedded
faults "$held"
pair embedded-held "$API/volumes"
volumed_down
if command -v redis-server >/dev/null; then
	rport=$(port)
	redis-server --port "$rport" --bind 127.0.0.1 --dir "$work" --save '' >"$work/redis.log" 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
	volumed_up redis --redis-url "redis://127.0.0.1:$rport/0"
	faults "$held"
	pair redis-held "$API/volumes"
	volumed_down
else
	echo "redis-server not found: no Redis line" >&2
fi
volumed_up executing
faults '{"jobduration":{"createVolume":"50ms"}}'
pair embedded-executing "$API/volumes"
volumed_down
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"

printf '%-20s %9s %9s %9s %8s %7s  %s\n' target req/s p50_ms p99_ms success ratio codes
for r in "${results[@]}"; do
	set -- $r
	[ "$1" = bare-chi ] && base=$2
	printf '%-20s %9s %9s %9s %8s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" "$(python3 -c "print(f'{$2/$base:.3f}')")" "$6"
done
