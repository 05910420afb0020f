#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the tests (tests/test_slurm.py):
#   sudo tests/slurm/up.sh DIR        (root; prints nothing on success but the node table)
# slurmctld and munge run in the root network namespace; each node is a network namespace with
# its own address on a private bridge (SUBNET.1, SUBNET.2; the controller is SUBNET.254) and its
# own slurmd, hostname and hosts file. Nothing outside that subnet is configured or contacted;
# the namespaces have no default route. tests/slurm/down.sh DIR stops it all by PID and removes
# the namespaces and the bridge. Installs slurmctld, slurmd, slurm-client and munge with apt-get
# when they are missing (Debian/Ubuntu).
set -euo pipefail
D="${1:?usage: up.sh DIR}"
SUBNET="${ESMDIST_TEST_SUBNET:-10.231.7}"
BRIDGE=esmdist-br
NODES=(node1 node2)
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$D/apt.log" 2>&1 \
        || { apt-get update -q >>"$D/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge \
             >>"$D/apt.log" 2>&1; }
fi
rm -rf "$D/state" "$D/spool" "$D/log" "$D/run"
mkdir -p "$D/state" "$D/spool" "$D/log" "$D/run"
export SLURM_CONF="$D/slurm.conf"

ip link add "$BRIDGE" type bridge
ip addr add "$SUBNET.254/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in 1 2; do
    ip netns add "esmdist-n$i"
    ip link add "esmdist-v$i" type veth peer name eth0 netns "esmdist-n$i"
    ip link set "esmdist-v$i" master "$BRIDGE"
    ip link set "esmdist-v$i" up
    ip -n "esmdist-n$i" addr add "$SUBNET.$i/24" dev eth0
    ip -n "esmdist-n$i" link set eth0 up
    ip -n "esmdist-n$i" link set lo up
done
# Seen only by the slurmds and their jobs (a private bind mount): /etc/hosts is never changed.
{ cat /etc/hosts; printf '%s ctl\n%s node1\n%s node2\n' "$SUBNET.254" "$SUBNET.1" "$SUBNET.2"; } >"$D/hosts"

cat >"$SLURM_CONF" <<CONF
ClusterName=esmdist-test
SlurmctldHost=localhost($SUBNET.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=node[1-2] NodeAddr=$SUBNET.[1-2] CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF

install -d -o munge -g munge -m 0755 /run/munge
if ! pgrep -x munged >/dev/null; then  # one already running (the distribution's) is used as is
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$D/run/munged.pid"
fi
slurmctld -f "$SLURM_CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
# nsenter, not `ip netns exec` (which remounts /sys and hides the cgroup tree from slurmd).
for i in 1 2; do
    nsenter --net="/run/netns/esmdist-n$i" unshare --mount --uts --propagation private \
        sh -c "hostname node$i && mount --bind '$D/hosts' /etc/hosts && exec slurmd -f '$SLURM_CONF' -N node$i"
done
for _ in $(seq 200); do [ "$(sinfo -h -o %t | sort -u | tr -d '\n')" = idle ] && break; sleep 0.1; done
sinfo -N -h -o '%N %t %o'
