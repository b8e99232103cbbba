#!/usr/bin/env bash
# local_cluster.sh -- a single-node Slurm cluster on this machine, for testing
# fttrain's Slurm support (sbatch templates, signals, requeue, array sweeps).
#
# What it does (idempotent: running it again only verifies a running cluster):
#   1. installs slurmctld, slurmd, slurm-client and munge with apt-get when
#      `sbatch` is missing (Debian 12 ships Slurm 22.05);
#   2. writes /etc/slurm/slurm.conf: one node named after `hostname -s` with
#      `nproc` CPUs, one default partition `debug`, jobs run as root, no
#      accounting, no cgroups (proctrack/linuxproc, task/none);
#   3. starts munged (--force, as root), then slurmctld, then slurmd as plain
#      daemons (no systemd needed); when the config changed since they were
#      started, it restarts slurmctld/slurmd;
#   4. waits until `sinfo` shows the node idle, then checks that
#      `srun hostname` and `sbatch --wait --wrap hostname` both work.
#
# Usage:
#   sudo bash slurm/local_cluster.sh          # install/start/verify
#   sudo bash slurm/local_cluster.sh --stop   # stop slurmd, slurmctld, munged
#
# Testing-oriented settings added to the base config:
#   AuthInfo=cred_expire=10   a requeued job may start again after ~10 s
#                             instead of the default 120 s (you can still
#                             force it with `scontrol update JobId=J StartTime=now`);
#   KillWait=5                SIGTERM -> SIGKILL grace for cancelled/timed-out
#                             jobs is 5 s instead of 30 s;
#   MinJobAge=600             finished jobs stay visible to scontrol for 10 min;
#   EnforcePartLimits=ALL     impossible requests (e.g. -N 5 on this one node)
#                             are rejected by sbatch instead of pending forever
#                             with Reason=PartitionConfig;
#   MailProg=/bin/true        silences "Configured MailProg is invalid";
#   Slurm{ctld,d}LogFile      logs in /var/log/slurm/{slurmctld,slurmd}.log
#                             (munged logs to /var/log/munge/munged.log).
#
# On failure it prints what went wrong and the tail of the daemon's log, and
# exits non-zero.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
CTLD_LOG=$LOGDIR/slurmctld.log
SLURMD_LOG=$LOGDIR/slurmd.log
MUNGE_LOG=/var/log/munge/munged.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

say() { echo "[local_cluster] $*"; }

show_log() {  # show_log FILE [LINES]
    local f=$1 n=${2:-30}
    if [[ -s $f ]]; then
        echo "----- last $n lines of $f -----" >&2
        tail -n "$n" "$f" >&2
        echo "-----" >&2
    else
        echo "(log $f is empty or missing)" >&2
    fi
}

die() {  # die MESSAGE [LOGFILE...]
    local msg=$1; shift
    echo "[local_cluster] ERROR: $msg" >&2
    local f
    for f in "$@"; do show_log "$f"; done
    exit 1
}

pid_alive() {  # pid_alive PIDFILE -> 0 when the pid in it is a live process
    local pf=$1 pid
    [[ -s $pf ]] || return 1
    pid=$(cat "$pf" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    local name=$1 pf=$2 pid i
    if pid_alive "$pf"; then
        pid=$(cat "$pf")
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name did not exit after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    else
        say "$name is not running"
    fi
    rm -f "$pf"
}

[[ $(id -u) -eq 0 ]] || die "must run as root (sudo bash $0)"

if [[ ${1:-} == --stop ]]; then
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
    exit 0
elif [[ $# -gt 0 ]]; then
    die "unknown argument '$1' (usage: $0 [--stop])"
fi

# ---------------------------------------------------------------- install
if ! command -v sbatch >/dev/null 2>&1; then
    say "installing Slurm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y slurmctld slurmd slurm-client munge >/tmp/local_cluster_apt.log 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update >>/tmp/local_cluster_apt.log 2>&1 || true
        apt-get install -y slurmctld slurmd slurm-client munge >>/tmp/local_cluster_apt.log 2>&1 \
            || die "apt-get install failed" /tmp/local_cluster_apt.log
    fi
fi
for b in munged munge unmunge slurmctld slurmd sbatch srun sinfo scontrol; do
    command -v "$b" >/dev/null 2>&1 || die "'$b' not found after install"
done

# ---------------------------------------------------------------- config
HOST=$(hostname -s)
# nproc counts OMP_NUM_THREADS as the CPU count (the test suite sets it to 1); the node has them all.
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
CTLD_HOST=$HOST
NODE_ADDR=""
if ! getent hosts "$HOST" >/dev/null 2>&1; then
    # The node name must resolve; fall back to loopback when it does not.
    CTLD_HOST="$HOST(127.0.0.1)"
    NODE_ADDR=" NodeAddr=127.0.0.1"
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR" /var/log/munge /run/munge
NEW_CONF=$(cat <<EOF
# Written by fttrain slurm/local_cluster.sh -- single-node test cluster.
ClusterName=local
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Testing conveniences (see the header of local_cluster.sh).
AuthInfo=cred_expire=10
KillWait=5
MinJobAge=600
EnforcePartLimits=ALL
MailProg=/bin/true
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
NodeName=$HOST CPUs=$NPROC RealMemory=20000${NODE_ADDR} State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
CONF_CHANGED=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$NEW_CONF" ]]; then
    [[ -f $CONF ]] && cp -p "$CONF" "$CONF.bak"
    printf '%s\n' "$NEW_CONF" >"$CONF"
    chmod 644 "$CONF"
    CONF_CHANGED=1
    say "wrote $CONF (node $HOST, $NPROC CPUs)"
fi

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
fi
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    stop_pidfile munged "$MUNGE_PID" >/dev/null
    say "starting munged"
    munged --force >/dev/null 2>&1 || die "munged failed to start" "$MUNGE_LOG"
    ok=0
    for ((i = 0; i < 20; i++)); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then ok=1; break; fi
        sleep 0.5
    done
    [[ $ok == 1 ]] || die "munge credential round-trip (munge -n | unmunge) fails" "$MUNGE_LOG"
fi

# ---------------------------------------------------------------- slurmctld / slurmd
if [[ $CONF_CHANGED == 1 ]] && { pid_alive "$CTLD_PID" || pid_alive "$SLURMD_PID"; }; then
    say "config changed: restarting Slurm daemons"
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
fi

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

if pid_alive "$CTLD_PID"; then
    say "slurmctld already running (pid $(cat "$CTLD_PID"))"
else
    say "starting slurmctld"
    slurmctld >>"$CTLD_LOG" 2>&1 || die "slurmctld failed to start" "$CTLD_LOG"
fi
ok=0
for ((i = 0; i < 60; i++)); do
    if ctld_up; then ok=1; break; fi
    pid_alive "$CTLD_PID" || sleep 1  # pid file may appear a moment late
    pid_alive "$CTLD_PID" || die "slurmctld exited" "$CTLD_LOG"
    sleep 0.5
done
[[ $ok == 1 ]] || die "slurmctld does not answer 'scontrol ping' after 30 s" "$CTLD_LOG"

if pid_alive "$SLURMD_PID"; then
    say "slurmd already running (pid $(cat "$SLURMD_PID"))"
else
    say "starting slurmd"
    slurmd >>"$SLURMD_LOG" 2>&1 || die "slurmd failed to start" "$SLURMD_LOG"
    sleep 1
    pid_alive "$SLURMD_PID" || die "slurmd exited right after start" "$SLURMD_LOG"
fi

# ---------------------------------------------------------------- wait for idle node
state=""
resumed=0
for ((i = 0; i < 120; i++)); do
    state=$(sinfo -h -n "$HOST" -o '%t' 2>/dev/null | head -n1 || true)
    case $state in
        idle | mix | alloc) break ;;
        down* | drain* | drng* | fail*)
            if [[ $resumed == 0 ]]; then
                say "node $HOST is '$state'; resuming it"
                scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
    esac
    sleep 0.5
done
case $state in
    idle | mix | alloc) say "node $HOST is $state" ;;
    *)
        scontrol show node "$HOST" >&2 2>/dev/null || true
        die "node $HOST did not become idle (state '$state')" "$SLURMD_LOG" "$CTLD_LOG"
        ;;
esac

# ---------------------------------------------------------------- smoke tests
out=$(timeout 60 srun -N1 -n1 -t 1 hostname 2>&1) \
    || die "'srun hostname' failed: $out" "$SLURMD_LOG" "$CTLD_LOG"
[[ $out == *"$HOST"* ]] || die "'srun hostname' printed '$out', expected '$HOST'"
say "srun hostname -> $out"

tmp_out=$(mktemp /tmp/local_cluster_sbatch.XXXXXX)
if ! timeout 90 sbatch --wait -N1 -n1 -t 1 -o "$tmp_out" --wrap hostname >/dev/null 2>&1; then
    show_log "$tmp_out" 10
    die "'sbatch --wait --wrap hostname' failed" "$SLURMD_LOG" "$CTLD_LOG"
fi
out=$(cat "$tmp_out")
rm -f "$tmp_out"
[[ $out == *"$HOST"* ]] || die "sbatch job wrote '$out', expected '$HOST'" "$SLURMD_LOG"
say "sbatch --wrap hostname -> $out"
say "cluster ready: partition 'debug', node $HOST, $NPROC CPUs (logs in $LOGDIR)"
