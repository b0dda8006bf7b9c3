#!/usr/bin/env bash
# scripts/run.sh is `make run`: the CloudStack simulator
# (test/cloudsim/cmd/cloudsim) in the background, with its state in
# <data-dir>/cloudsim, then volumed in the foreground against it, as the
# simulator's appliance VM. It stops the simulator when volumed exits, and
# on Ctrl-C, SIGINT, SIGTERM or SIGHUP stops volumed first, then the
# simulator. It exits with volumed's status. `make run` builds both binaries
# first; arguments are passed on to volumed.
#
# Environment: VOLUMED_BIN and CLOUDSIM_BIN (default bin/volumed and
# bin/cloudsim), VOLUMED_DATA_DIR (default ./volumed-data), CLOUDSIM_LISTEN
# (the simulator's address, default 127.0.0.1:8080), VOLUMED_VM_ID (default
# the simulator's appliance VM); the other VOLUMED_* and CLOUDSIM_* variables
# reach volumed and the simulator as they are (e.g. VOLUMED_LISTEN,
# VOLUMED_NATS_CONFIG, VOLUMED_NBD_LISTEN, CLOUDSIM_LOCAL_DEVICES).
# Relative paths are relative to the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

volumed_bin=${VOLUMED_BIN:-bin/volumed}
cloudsim_bin=${CLOUDSIM_BIN:-bin/cloudsim}
data_dir=${VOLUMED_DATA_DIR:-./volumed-data}
sim_listen=${CLOUDSIM_LISTEN:-127.0.0.1:8080}
# The simulator's defaults (cloudsim.DefaultAPIKey, DefaultSecretKey,
# ApplianceVMID), unless its environment changes them.
api_key=${CLOUDSIM_API_KEY:-cloudsim-api-key}
secret_key=${CLOUDSIM_SECRET_KEY:-cloudsim-secret-key}
vm_id=${VOLUMED_VM_ID:-87654321-4321-4321-4321-210987654321}

for bin in "$volumed_bin" "$cloudsim_bin"; do
	if [ ! -x "$bin" ]; then
		echo "run: $bin missing (make run builds it)" >&2
		exit 1
	fi
done

sim_host=${sim_listen%:*}
sim_host=${sim_host#[}
sim_host=${sim_host%]}
sim_port=${sim_listen##*:}
[ -n "$sim_host" ] || sim_host=127.0.0.1
sim_url_host=$sim_host
[[ $sim_host != *:* ]] || sim_url_host="[$sim_host]"
sim_url="http://$sim_url_host:$sim_port/client/api"

# sim_answers: whether a simulator answers GET /_sim/stats on sim_listen.
sim_answers() {
	local line=
	{ exec 3<>"/dev/tcp/$sim_host/$sim_port"; } 2>/dev/null || return 1
	printf 'GET /_sim/stats HTTP/1.0\r\nHost: %s\r\n\r\n' "$sim_listen" >&3 || true
	IFS= read -r -t 2 line <&3 || true
	exec 3>&-
	[[ $line == HTTP/1.?" 200"* ]]
}

sim=
vol=
# stop PID: SIGTERM, then wait for it.
stop() {
	if kill -0 "$1" 2>/dev/null; then
		kill -TERM "$1" 2>/dev/null || true
	fi
	wait "$1" 2>/dev/null || true
}
cleanup() {
	trap '' INT TERM HUP
	if [ -n "$vol" ]; then stop "$vol"; fi
	if [ -n "$sim" ]; then stop "$sim"; fi
}
trap cleanup EXIT
# A signal stops volumed, whose wait below then returns; before volumed is
# started it ends the script (and cleanup stops the simulator).
on_signal() {
	if [ -n "$vol" ]; then
		kill -INT "$vol" 2>/dev/null || true
	else
		exit 130
	fi
}
trap on_signal INT TERM HUP

if sim_answers; then
	echo "run: a simulator already answers on $sim_listen (an earlier make run still running?)" >&2
	exit 1
fi
mkdir -p "$data_dir"
# Both run in process groups of their own (set -m), so that Ctrl-C reaches
# this script only and the order of the shutdown is kept.
set -m
"$cloudsim_bin" --listen "$sim_listen" --state-dir "$data_dir/cloudsim" --api-key "$api_key" \
	--secret-key "$secret_key" </dev/null &
sim=$!
set +m
for _ in $(seq 300); do
	if ! kill -0 "$sim" 2>/dev/null; then
		status=0
		wait "$sim" || status=$?
		sim=
		echo "run: the simulator exited with status $status (is $sim_listen in use?)" >&2
		exit 1
	fi
	if sim_answers; then break; fi
	sleep 0.1
done
if ! sim_answers; then
	echo "run: the simulator does not answer on $sim_listen" >&2
	exit 1
fi

set -m
"$volumed_bin" --data-dir "$data_dir" --cloudstack-url "$sim_url" \
	--cloudstack-api-key "$api_key" --cloudstack-secret-key "$secret_key" --vm-id "$vm_id" "$@" </dev/null &
vol=$!
set +m
# wait returns early when a signal is trapped: wait again until volumed is
# gone, then once more for its status (bash keeps it).
while kill -0 "$vol" 2>/dev/null; do wait "$vol" || true; done
status=0
wait "$vol" || status=$?
vol=
exit "$status"
