#!/usr/bin/env bash
# Stops what tests/slurm/up.sh DIR started, by the PIDs it recorded, and removes the network
# namespaces and the bridge. Safe to run twice.
D="${1:?usage: down.sh DIR}"
stop() {  # NAME PID
    [ -n "$2" ] || return 0
    kill -TERM "$2" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.1; done
    echo "$1 (pid $2) ignored SIGTERM: killing it"; kill -KILL "$2" 2>/dev/null
}
for n in node1 node2; do stop "slurmd $n" "$(cat "$D/run/slurmd-$n.pid" 2>/dev/null)"; done
stop slurmctld "$(cat "$D/run/slurmctld.pid" 2>/dev/null)"
stop munged "$(cat "$D/run/munged.pid" 2>/dev/null)"
for i in 1 2; do ip netns del "esmdist-n$i" 2>/dev/null; done  # the veth pairs go with them
ip link del esmdist-br 2>/dev/null
exit 0
