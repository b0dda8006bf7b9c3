#!/usr/bin/env bash
# bench/inventory.sh (make bench-inventory): what a large CloudStack
# inventory costs volumed (bench/inventory): a force-sync, the periodic
# reconcile and the pre-check cache's refresh, at each of SIZES
# (VOLUMES/VMS, default 1000/100,10000/1000), for volumed built from BASE
# (default main) and from this tree, one after the other. Everything it
# starts and writes is gone when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/base.sh
BASE=${BASE:-main}
SIZES=${SIZES:-1000/100,10000/1000}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

go build -o "$work/volumed" ./cmd/volumed
go build -o "$work/cloudsim" ./test/cloudsim/cmd/cloudsim
go build -o "$work/inventory" ./bench/inventory
build_base "$BASE" "$work"

"$work/inventory" -label "before ($BASE $(rev_of "$BASE"))" -volumed "$work/volumed-base" -cloudsim "$work/cloudsim" -sizes "$SIZES"
echo
"$work/inventory" -label "after ($(rev_of HEAD))" -volumed "$work/volumed" -cloudsim "$work/cloudsim" -sizes "$SIZES"
