#!/usr/bin/env bash
# bench/ops.sh (make bench-ops): volumed's CPU per operation and latency on
# the mixed workload (bench/ops: CLIENTS clients, default 8, each running
# create -> attach -> detach -> delete against the simulator with JOB jobs,
# default 20ms, embedded store), for volumed built from BASE (default main)
# and from this tree, one after the other, ROUNDS times (default 2), each
# over DURATION (default 30s). PROFILE=dir also writes a CPU profile of
# this tree's volumed per round (it has --pprof-listen). Everything it
# starts and writes, but the profiles, is gone when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/base.sh
BASE=${BASE:-main}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-8}
JOB=${JOB:-20ms}
DURATION=${DURATION:-30s}
PROFILE=${PROFILE:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

go build -o "$work/volumed" ./cmd/volumed
go build -o "$work/cloudsim" ./test/cloudsim/cmd/cloudsim
go build -o "$work/ops" ./bench/ops
build_base "$BASE" "$work"

for r in $(seq "$ROUNDS"); do
	"$work/ops" -label "round $r before ($BASE $(rev_of "$BASE"))" -volumed "$work/volumed-base" -cloudsim "$work/cloudsim" \
		-clients "$CLIENTS" -job "$JOB" -duration "$DURATION"
	prof=()
	if [ -n "$PROFILE" ]; then mkdir -p "$PROFILE"; prof=(-profile "$PROFILE/ops-$r.pprof"); fi
	"$work/ops" -label "round $r after ($(rev_of HEAD))" -volumed "$work/volumed" -cloudsim "$work/cloudsim" \
		-clients "$CLIENTS" -job "$JOB" -duration "$DURATION" "${prof[@]}"
done
