#!/bin/bash
# A one-node Slurm on this machine (slurmctld + slurmd on localhost, munge auth), for trying
# cluster/slurm/retro-dist.sbatch without a cluster. Needs root (apt-get, munge) and no systemd.
#   cluster/slurm/local-slurm.sh install      # apt-get install slurm-wlm (and munge) if sbatch is absent
#   cluster/slurm/local-slurm.sh start DIR    # slurm.conf, state and logs in DIR; prints `export SLURM_CONF=...`
#   cluster/slurm/local-slurm.sh stop DIR     # stops the daemons started in DIR by their pids
# Every client command (sbatch, squeue, sacct) needs SLURM_CONF=DIR/slurm.conf in its environment.
set -euo pipefail
cmd=${1:?usage: local-slurm.sh install|start DIR|stop DIR}

write_conf() {
  local dir=$1 cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # MB, leave 20% to the system
  mkdir -p "$dir/state" "$dir/spool"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {  # one munged per host; reuse a running one
  if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$1/munged.ours"  # stop ends it only when this script started it
  for _ in $(seq 20); do munge -n >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "local-slurm: munged did not start" >&2; return 1
}

case $cmd in
  install)
    command -v sbatch >/dev/null && exit 0
    apt-get install -y slurm-wlm >/dev/null  # pulls munge and creates /etc/munge/munge.key
    ;;
  start)
    dir=$(realpath -m "${2:?usage: local-slurm.sh start DIR}")
    write_conf "$dir"
    start_munge "$dir"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld
    slurmd -N localhost  # the host name differs, so -N maps this host to NodeName=localhost
    for _ in $(seq 60); do
      if sinfo -h -o %t 2>/dev/null | grep -qx idle; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
      sleep 0.5
    done
    echo "local-slurm: node not idle after 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
    exit 1
    ;;
  stop)
    dir=$(realpath -m "${2:?usage: local-slurm.sh stop DIR}")
    for d in slurmd slurmctld; do
      if [ -f "$dir/$d.pid" ]; then
        pid=$(cat "$dir/$d.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      fi
    done
    if [ -f "$dir/munged.ours" ] && [ -f /run/munge/munged.pid ]; then
      kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
      rm -f "$dir/munged.ours"
    fi
    ;;
  *) echo "usage: local-slurm.sh install|start DIR|stop DIR" >&2; exit 2 ;;
esac
