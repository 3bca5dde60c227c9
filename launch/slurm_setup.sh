# bash launch/slurm_setup.sh   (as root)
# Starts a one-node Slurm cluster on this machine (Debian's slurm-wlm 22.05 and munge) for the
# Slurm tests. Idempotent: installs the packages if missing, (re)writes /etc/slurm/slurm.conf only
# when it would change, starts munged/slurmctld/slurmd only when they are not running, and waits
# until the node is idle. A second run on a ready cluster takes well under a second.
# Environment: SLURM_SETUP_PARTITION (default "debug"), SLURM_SETUP_TIMEOUT seconds (default 60).
set -euo pipefail

PARTITION="${SLURM_SETUP_PARTITION:-debug}"
TIMEOUT="${SLURM_SETUP_TIMEOUT:-60}"
CONF=/etc/slurm/slurm.conf

say() { echo "slurm_setup: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"

# ---------------------------------------------------------------- packages
if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    say "installing munge slurmctld slurmd slurm-client"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(munge slurmctld slurmd slurm-client)
    # NOTE: a fresh image may have no package lists; update only when the plain install fails.
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
munge -n </dev/null | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ---------------------------------------------------------------- slurm.conf
HOST="$(hostname -s)"
# The node line as slurmd detects it, with RealMemory lowered by 10% so that the daemon's own
# memory never makes the node look smaller than configured (which would drain it).
NODE_LINE="$(slurmd -C | head -n 1 | awk '{
    for (i = 1; i <= NF; i++) if ($i ~ /^RealMemory=/) { split($i, a, "="); $i = "RealMemory=" int(a[2] * 0.9) }
    print }')"
[ -n "$NODE_LINE" ] || die "slurmd -C printed no node line"

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
NEW="$(mktemp)"
trap 'rm -f "$NEW"' EXIT
cat >"$NEW" <<EOF
# Written by launch/slurm_setup.sh: a one-node cluster for the Blues Slurm tests.
ClusterName=blues
SlurmctldHost=${HOST}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=15
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
# Short scheduler intervals: a requeued job restarts after about 20 s instead of about 150 s.
SchedulerParameters=bf_interval=5,sched_interval=5
# Finished jobs stay visible to 'scontrol show job' for an hour (there is no accounting database).
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
${NODE_LINE} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

changed=0
if [ ! -f "$CONF" ] || ! cmp -s "$NEW" "$CONF"; then
    say "writing $CONF"
    cp "$NEW" "$CONF"
    chmod 644 "$CONF"
    changed=1
fi

# ---------------------------------------------------------------- daemons
stop_daemon() {  # stop one daemon by its pid file (never by name)
    local pidfile=$1
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")"
        for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
    fi
}
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [ "$changed" -eq 1 ]; then
    stop_daemon /run/slurm/slurmd.pid
    stop_daemon /run/slurm/slurmctld.pid
fi
if ! running /run/slurm/slurmctld.pid; then
    say "starting slurmctld"
    /usr/sbin/slurmctld
fi
if ! running /run/slurm/slurmd.pid; then
    say "starting slurmd"
    /usr/sbin/slurmd
fi

# ---------------------------------------------------------------- wait for the node
deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*)
            scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mixed|allocated|completing) say "node $HOST is $state; partition $PARTITION is ready" ;;
    *) die "node $HOST is '${state:-unknown}' after ${TIMEOUT}s (see /var/log/slurm/slurmctld.log and slurmd.log)" ;;
esac
