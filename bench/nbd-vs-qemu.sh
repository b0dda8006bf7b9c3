#!/usr/bin/env bash
# nbd-vs-qemu.sh: the same workloads, in one run, on the same 1 GiB loop
# device (on a sparse file), through volumed's NBD server (bench/nbdserve,
# the nbd package volumed runs) and through qemu-nbd, with the same clients:
#
#   nbdcopy read           whole device, all data, to null:
#   nbdcopy write          a 1 GiB data file onto the export (no flush:
#                          nbdcopy's default)
#   nbdcopy --flush write  the same, flushed at the end (durable)
#   qemu-img convert qcow2 a sparse device (32 MiB of data) to a qcow2 file
#   qemu-img convert into  a half-sparse 1 GiB raw file into the export (-n)
#
# Each workload runs ROUNDS times per server, alternating, and the best
# time counts. The ratio is qemu-nbd's time over volumed's: above 1.0 means
# volumed is faster. Needs root (losetup), nbdcopy, qemu-img, qemu-nbd, go.
#
#   sudo bench/nbd-vs-qemu.sh          # ROUNDS=3 by default
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SIZE_MB=1024
here=$(cd "$(dirname "$0")/.." && pwd)
for t in nbdcopy qemu-img qemu-nbd losetup blkdiscard go; do
	command -v "$t" >/dev/null || { echo "nbd-vs-qemu: needs $t (Debian: libnbd-bin qemu-utils util-linux)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "nbd-vs-qemu: needs root for losetup" >&2; exit 1; }

work=$(mktemp -d /var/tmp/nbd-vs-qemu.XXXXXX)
[ -n "${KEEP:-}" ] && echo "work dir: $work" >&2
loop="" vpid="" qpid=""
cleanup() {
	[ -n "$vpid" ] && kill "$vpid" 2>/dev/null && wait "$vpid" 2>/dev/null
	[ -n "$qpid" ] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
	[ -n "$loop" ] && losetup -d "$loop"
	[ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

(cd "$here" && go build -o "$work/nbdserve" ./bench/nbdserve)
truncate -s ${SIZE_MB}M "$work/vol.img"
loop=$(losetup -f --show "$work/vol.img")
# Sources: all data; half data (alternate 8 MiB data and holes).
head -c ${SIZE_MB}M /dev/urandom >"$work/full.img"
truncate -s ${SIZE_MB}M "$work/half.img"
for ((i = 0; i < SIZE_MB; i += 16)); do
	dd if="$work/full.img" of="$work/half.img" bs=1M skip=$i seek=$i count=8 conv=notrunc status=none
done

vport=$((20000 + RANDOM % 10000)) qport=$((vport + 1))
"$work/nbdserve" -listen 127.0.0.1:$vport -name vol00000001 -path "$loop" >"$work/nbdserve.out" 2>"$work/nbdserve.err" &
vpid=$!
qemu-nbd -t -e 16 -f raw -x vol00000001 -b 127.0.0.1 -p $qport --discard=unmap "$loop" 2>"$work/qemu-nbd.err" &
qpid=$!
for p in $vport $qport; do
	for _ in $(seq 100); do nbdinfo nbd://127.0.0.1:$p/vol00000001 >/dev/null 2>&1 && break; sleep 0.1; done
done
declare -A url=([volumed]=nbd://127.0.0.1:$vport/vol00000001 [qemu-nbd]=nbd://127.0.0.1:$qport/vol00000001)

# Device states the workloads start from.
state_full() { dd if="$work/full.img" of="$loop" bs=4M conv=fsync status=none; }
state_sparse() {
	blkdiscard "$loop"
	for ((i = 0; i < 32; i++)); do
		dd if="$work/full.img" of="$loop" bs=1M skip=$i seek=$((i * 32)) count=1 conv=notrunc status=none
	done
	sync "$loop"
}
state_empty() { blkdiscard "$loop"; }

# The workloads; $1 is the export URI.
run_read() { nbdcopy "$1" null:; }
run_write() { nbdcopy "$work/full.img" "$1"; }
run_writeflush() { nbdcopy --flush "$work/full.img" "$1"; }
run_qcow2() { rm -f "$work/out.qcow2"; qemu-img convert -f raw -O qcow2 "$1" "$work/out.qcow2"; }
run_into() { qemu-img convert -n -f raw -O raw "$work/half.img" "$1"; }

# check verifies the device after a workload.
check_read() { :; }
check_write() { cmp -s "$work/full.img" "$loop"; }
check_writeflush() { check_write; }
check_qcow2() { qemu-img compare -q -f raw -F qcow2 "$loop" "$work/out.qcow2"; }
check_into() { cmp -s "$work/half.img" "$loop"; }

declare -A best
now() { date +%s.%N; }
measure() { # workload state server
	local w=$1 st=$2 srv=$3 t0 t1 dt
	"state_$st"
	sync
	t0=$(now)
	"run_$w" "${url[$srv]}"
	t1=$(now)
	"check_$w" || { echo "nbd-vs-qemu: $w through $srv: the device does not hold what was written" >&2; exit 1; }
	dt=$(echo "$t1 - $t0" | bc -l)
	if [ -z "${best[$w/$srv]:-}" ] || (($(echo "$dt < ${best[$w/$srv]}" | bc -l))); then best[$w/$srv]=$dt; fi
}

workloads=(read:full write:empty writeflush:empty qcow2:sparse into:empty)
for ((r = 0; r < ROUNDS; r++)); do
	for ws in "${workloads[@]}"; do
		w=${ws%%:*} st=${ws#*:}
		if ((r % 2)); then order=(qemu-nbd volumed); else order=(volumed qemu-nbd); fi
		for srv in "${order[@]}"; do measure "$w" "$st" "$srv"; done
	done
done

declare -A title=([read]="nbdcopy read (1 GiB, all data)" [write]="nbdcopy write (1 GiB)"
	[writeflush]="nbdcopy --flush write (1 GiB)"
	[qcow2]="qemu-img convert -O qcow2, sparse device (32 MiB data)" [into]="qemu-img convert -n into the export (1 GiB, half holes)")
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); best of $ROUNDS; $(date -u +%FT%TZ)"
printf '| %s | %s | %s | %s |\n' workload volumed qemu-nbd "ratio (qemu-nbd time / volumed time)"
printf '|---|---|---|---|\n'
for ws in "${workloads[@]}"; do
	w=${ws%%:*}
	v=${best[$w/volumed]} q=${best[$w/qemu-nbd]}
	case $w in
	read | write | writeflush) fmt() { printf '%.0f MB/s (%.2f s)' "$(echo "$SIZE_MB * 1.048576 / $1" | bc -l)" "$1"; } ;;
	*) fmt() { printf '%.2f s' "$1"; } ;;
	esac
	printf '| %s | %s | %s | %.2f× |\n' "${title[$w]}" "$(fmt "$v")" "$(fmt "$q")" "$(echo "$q / $v" | bc -l)"
done
