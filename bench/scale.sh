#!/usr/bin/env bash
# bench/scale.sh N: builds volumed, the CloudStack simulator and
# bench/scale, then runs bench/scale with N operations on the embedded
# store, and on a Redis of its own when redis-server is installed (make
# bench-scale). Everything it starts and writes is gone when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
work=$(mktemp -d)
rpid=
cleanup() {
	if [ -n "$rpid" ]; then kill "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true; fi
	rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/volumed" ./cmd/volumed
go build -o "$work/cloudsim" ./test/cloudsim/cmd/cloudsim
go build -o "$work/scale" ./bench/scale

"$work/scale" -store kv -n "$N" -volumed "$work/volumed" -cloudsim "$work/cloudsim" -work "$work/kv"
rm -rf "$work/kv"
if ! command -v redis-server >/dev/null; then
	echo "redis-server not found: no Redis figures" >&2
	exit 0
fi
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/redis"
redis-server --port "$rport" --bind 127.0.0.1 --dir "$work/redis" --save '' --appendonly no >"$work/redis.log" 2>&1 &
rpid=$!
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo
"$work/scale" -store redis -n "$N" -redis-url "redis://127.0.0.1:$rport/0" -volumed "$work/volumed" \
	-cloudsim "$work/cloudsim" -work "$work/redis-run"
echo "  redis-server $(redis-cli -p "$rport" info memory | grep -E '^used_memory_human' | tr -d '\r')"
