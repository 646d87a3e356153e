#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's packages (apt-get install slurm-wlm munge), to
# try `hydra/launcher=slurm` before a real cluster; the tests start it the same way. Everything lives in
# DIR (config, munge key and socket, state, logs) and binds to 127.0.0.1; nothing under /etc is touched.
#
# Usage: scripts/slurm_local.sh DIR [PORT]     (slurmctld on PORT, default 6817; slurmd on PORT+1)
#   then, in another shell:  export SLURM_CONF=DIR/slurm.conf; sinfo
#   python train.py -m hydra/launcher=slurm hydra.launcher.gpus_per_node=null hydra.launcher.cpus_per_task=1 ...
# Runs in the foreground; Ctrl-C (or `kill -- -PGID` when started with `setsid`) stops all three daemons.
# Run it as root (slurmd starts jobs as their users) or as the one user whose jobs it runs.
set -euo pipefail
dir="${1:?usage: scripts/slurm_local.sh DIR [PORT]}"
port="${2:-6817}"
for daemon in munged slurmctld slurmd; do
    command -v "$daemon" >/dev/null || [[ -x "/usr/sbin/$daemon" ]] || {
        echo "slurm_local.sh: $daemon not found: apt-get install slurm-wlm munge" >&2; exit 2; }
done
export PATH="$PATH:/usr/sbin"
mkdir -p "$dir"/{munge,state,spool,log}
dir="$(cd "$dir" && pwd)"
chmod 700 "$dir/munge"
[[ -f "$dir/munge/munge.key" ]] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 600 "$dir/munge/munge.key"; }
node="$(hostname -s)" cpus="$(nproc)" memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10))
user="$(id -un)"
cat > "$dir/slurm.conf" <<EOF
ClusterName=histo-local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# no cgroups (containers rarely allow them) and no accounting database: one machine, one user
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$dir/slurm.conf"

pids=()
stop() {
    # jobs first: their step daemons (slurmstepd) leave this process group and would outlive the cluster
    local jobs
    jobs="$(squeue -h -o %A 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        scancel --full --signal=KILL $jobs 2>/dev/null || true
        for _ in $(seq 50); do [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break; sleep 0.2; done
    fi
    ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 143' TERM INT
# each daemon in a session of its own: Ctrl-C or a signal to this group reaches only this script, which
# then cancels the jobs while the controller still runs, and stops the daemons after them
setsid munged -F --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" --pid-file="$dir/munge/munged.pid" \
    --seed-file="$dir/munge/seed" --log-file="$dir/log/munged.log" &
pids+=($!)
until [[ -S "$dir/munge/socket" ]]; do sleep 0.1; done
setsid slurmctld -D -f "$SLURM_CONF" &
pids+=($!)
setsid slurmd -D -f "$SLURM_CONF" &
pids+=($!)
echo "slurm_local.sh: one-node cluster up; use it with: export SLURM_CONF=$SLURM_CONF"
wait -n
echo "slurm_local.sh: a daemon stopped; logs in $dir/log" >&2
exit 1
