#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the tests: its own munged, one slurmctld and two
# slurmd daemons emulating the nodes node1 and node2, all on 127.0.0.1.
#
#   tests/slurm/cluster.sh start   # prints `export SLURM_CONF=...`; waits until both nodes are idle
#   tests/slurm/cluster.sh stop    # stops what `start` started (by pid file), nothing else
#   tests/slurm/cluster.sh status
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages (.ci/run installs
# them). Everything lives under $SLURM_TEST_DIR (default /tmp/gpt2-slurm-cluster); clients find
# the cluster through SLURM_CONF, so a machine's own /etc/slurm is left alone. Both nodes claim 16
# CPUs whatever the machine has (SlurmdParameters=config_overrides): the tests run independent jobs
# side by side (an 8-rank job, four 2-rank ones and the data jobs) on 2 real cores.
# cred_expire=10: a requeued job may start again after 10 s instead of Slurm's default 120 (it must
# wait until its revoked credential expires, or slurmd refuses it as "Job credential revoked").
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/gpt2-slurm-cluster}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket
NODES=(node1 node2)
CTLD_PORT=${SLURM_TEST_PORT:-16817}

die() { echo "cluster.sh: $*" >&2; exit 1; }

# A pid file names a live daemon only if that pid still runs the program named (pids are reused).
pid_alive() { [[ -f $1 && $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]; }

write_config() {
    local host
    host=$(hostname)
    mkdir -p "$DIR/state" "$DIR/munge"
    cat > "$CONF" <<EOF
ClusterName=gpt2test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool-%n
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=2
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=16 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    pid_alive "$DIR/munged.pid" munged && return
    [[ -f $DIR/munge/munge.key ]] || mungekey -c -k "$DIR/munge/munge.key" >/dev/null
    chmod 700 "$DIR/munge"
    chmod 600 "$DIR/munge/munge.key"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munge/seed"
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null || die "munge does not work; see $DIR/munged.log"
}

resolve_node_names() {
    # The batch script sets MASTER_ADDR from `scontrol show hostnames`: the node names must
    # resolve, as a real cluster's DNS makes them.
    local node
    for node in "${NODES[@]}"; do
        getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >> /etc/hosts
    done
}

wait_for_idle_nodes() {
    local tries
    for tries in $(seq 1 60); do
        if [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2=="idle"' | wc -l) -eq ${#NODES[@]} ]]; then
            return
        fi
        sleep 0.5
    done
    sinfo -N >&2 || true
    die "the nodes did not become idle within 30 s; see $DIR/slurmctld.log and $DIR/slurmd-*.log"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "needs root (the daemons run as SlurmUser=root)"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        || die "Slurm is not installed: apt-get install slurmctld slurmd slurm-client munge"
    write_config
    export SLURM_CONF=$CONF
    start_munge
    resolve_node_names
    pid_alive "$DIR/slurmctld.pid" slurmctld || slurmctld -c -f "$CONF"
    local node
    for node in "${NODES[@]}"; do
        pid_alive "$DIR/slurmd-$node.pid" slurmd || slurmd -f "$CONF" -N "$node"
    done
    wait_for_idle_nodes
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    # SIGTERM to every daemon at once, then wait for all (up to 5 s, then SIGKILL): one after another,
    # each slurmd's shutdown took about 2.5 s.
    local file pids=() pid tries
    for file in "$@"; do
        [[ -f $file ]] || continue
        pid_alive "$file" "$(basename "$file" .pid | cut -d- -f1)" && pids+=("$(cat "$file")")
    done
    ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
    for tries in $(seq 1 50); do
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
        [[ -z ${pid:-} ]] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; done
    rm -f "$@"
}

stop() {
    export SLURM_CONF=$CONF
    [[ -f $CONF ]] && scancel --user=root >/dev/null 2>&1 || true
    local node files=()
    for node in "${NODES[@]}"; do files+=("$DIR/slurmd-$node.pid"); done
    stop_daemons "${files[@]}" "$DIR/slurmctld.pid"
    stop_daemons "$DIR/munged.pid"  # last: the Slurm daemons authenticate through it while they stop
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) export SLURM_CONF=$CONF; sinfo -N ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
