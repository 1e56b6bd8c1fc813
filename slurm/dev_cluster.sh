#!/usr/bin/env bash
# A one-node Slurm cluster on this machine (localhost), for hpcprune's Slurm tests and for trying
# slurm/sweep.sbatch without a real cluster. Debian/Ubuntu packages, no systemd, no cgroups.
#
#   slurm/dev_cluster.sh start    install the packages when missing (root), configure, start; idempotent
#   slurm/dev_cluster.sh stop     cancel every job, then stop exactly the daemons started here (pid files)
#   slurm/dev_cluster.sh status   daemons, node state, queue
#   slurm/dev_cluster.sh reset    stop, then delete all state (config, controller state, accounting DB)
#   slurm/dev_cluster.sh env      print the export line for SLURM_CONF
#
# Everything lives under $HPCPRUNE_SLURM_STATE (default /var/tmp/hpcprune-slurm): etc/ (slurm.conf,
# slurmdbd.conf), run/ (pid files, sockets), log/, munge/ (key), db/ (MariaDB), ctld/, slurmd/.
# Nothing under /etc is changed, except that /etc/slurm/slurm.conf is made a symlink to etc/slurm.conf
# when no slurm.conf is there (so plain sbatch/srun/squeue find it); an existing file is left alone
# and you export SLURM_CONF instead (`eval "$(slurm/dev_cluster.sh env)"`).
#
# Daemons, in start order, each waited for: munged -> mariadbd -> slurmdbd -> slurmctld -> slurmd.
# Accounting (slurmdbd + MariaDB) is needed: without it submitit cannot see a job that died without a
# result (scancel, time limit, OOM) and waits forever.
#
# CPUs: the node advertises HPCPRUNE_SLURM_CPU_FACTOR (default 4) Slurm CPUs per real core
# (SlurmdParameters=config_overrides). A sweep job holds its ranks' CPUs while its fine-tune job runs
# as a second job; on a 2-core box with one Slurm CPU per core the fine-tune job would wait for ever.
# Waiting ranks sleep (they do not spin), so the jobs share the real cores without fighting.
#
# Job ids: a fresh state starts at a FirstJobId taken from the clock (seconds), so ids (and with them
# submitit folders, outputs/slurm-<jobid> run directories) are not reused after a reset, unless the
# cluster ran more than one job per second on average.
set -euo pipefail

STATE=${HPCPRUNE_SLURM_STATE:-/var/tmp/hpcprune-slurm}
CPU_FACTOR=${HPCPRUNE_SLURM_CPU_FACTOR:-4}
DB_PORT=${HPCPRUNE_SLURM_DB_PORT:-13306}
CTLD_PORT=${HPCPRUNE_SLURM_PORT:-6817}   # slurmd uses +1, slurmdbd +2
CRED_EXPIRE=${HPCPRUNE_SLURM_CRED_EXPIRE:-15}
CLUSTER=hpcprune-dev
PACKAGES=(munge slurm-wlm slurmdbd mariadb-server)

ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log
CONF=$ETC/slurm.conf
MUNGE_SOCKET=$RUN/munge.socket
DB_SOCKET=$RUN/mariadbd.sock
export SLURM_CONF=$CONF

say() { echo "dev_cluster: $*"; }
die() { echo "dev_cluster: error: $*" >&2; exit 1; }

# ---- processes by pid file -------------------------------------------------------------------------
# pid file names are the daemons' names; a pid counts only while /proc/PID/comm is that daemon
pid_of() {  # name -> pid of the live daemon started here, or nothing
  local f=$RUN/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] && echo "$pid"
  return 0
}

have_pid() { [ -n "$(pid_of "$1")" ]; }

wait_for() {  # seconds description command...: retry until the command succeeds
  local limit=$1 what=$2 t0=$SECONDS
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - t0)) -lt "$limit" ] || die "$what did not come up within ${limit}s (logs: $LOG)"
    sleep 0.2
  done
}

stop_pid() {  # name: TERM, wait up to 30 s, then KILL
  local name=$1 pid t=0
  pid=$(pid_of "$name")
  if [ -z "$pid" ]; then
    rm -f "$RUN/$name.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  while [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; do
    sleep 0.2
    t=$((t + 1))
    if [ $t -eq 150 ]; then
      say "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "$RUN/$name.pid"
  say "stopped $name (pid $pid)"
}

# ---- installation and configuration ------------------------------------------------------------
install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}): run as root, or: apt-get install -y --no-install-recommends ${PACKAGES[*]}"
  say "installing ${PACKAGES[*]}"
  local t0=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  say "installed in $((SECONDS - t0)) s"
}

write_config() {
  local host cpus_line boards sockets cores threads mem cpus first_id
  host=$(hostname -s)
  # slurmd -C: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  cpus_line=$(slurmd -C | head -1)
  val() { sed -n "s/.*\\b$1=\\([0-9]*\\).*/\\1/p" <<<"$cpus_line"; }
  boards=$(val Boards) sockets=$(val SocketsPerBoard) cores=$(val CoresPerSocket) threads=$(val ThreadsPerCore)
  mem=$(($(val RealMemory) * 9 / 10))  # ~90 %: the full figure drains the node ("Low RealMemory")
  cores=$((cores * CPU_FACTOR))
  cpus=$((boards * sockets * cores * threads))
  first_id=1
  if [ ! -d "$STATE/ctld" ] || [ -z "$(ls -A "$STATE/ctld" 2>/dev/null)" ]; then
    first_id=$(( $(date +%s) % 60000000 + 1000 ))  # below MaxJobId (67043328); wraps every ~2 years
    echo "$first_id" >"$ETC/first_job_id"
  elif [ -s "$ETC/first_job_id" ]; then
    first_id=$(cat "$ETC/first_job_id")
  fi
  cat >"$CONF" <<EOF
# written by slurm/dev_cluster.sh: a one-node dev cluster on localhost (edit the script, not this file)
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
PlugStackConfig=$ETC/plugstack.conf
# no cgroups on this machine kind
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node claims $CPU_FACTOR CPUs per real core (see the script): accept the configured counts
SlurmdParameters=config_overrides
MpiDefault=pmi2
SchedulerType=sched/backfill
# schedule every 5 s (defaults 60 and 30): a requeued job starts soon after its hold (cred_expire)
SchedulerParameters=sched_interval=5,bf_interval=5
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmdTimeout=300
MailProg=/bin/true
FirstJobId=$first_id
# accounting: slurmdbd + MariaDB (submitit reads job states with sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((CTLD_PORT + 2))
# with slurmdbd this names the munge socket used towards slurmdbd (not a password)
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$ETC/plugstack.conf"
  (
    umask 077
    cat >"$ETC/slurmdbd.conf" <<EOF
# written by slurm/dev_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$((CTLD_PORT + 2))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db_password")
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable slurmdbd.conf
}

link_system_conf() {
  local sys=/etc/slurm/slurm.conf
  if [ -L "$sys" ] && [ "$(readlink "$sys")" = "$CONF" ]; then
    return 0
  fi
  if [ -e "$sys" ] || [ -L "$sys" ]; then
    say "$sys exists and is not ours: left alone; use: export SLURM_CONF=$CONF"
    return 0
  fi
  if [ -w /etc ] && mkdir -p /etc/slurm 2>/dev/null && ln -s "$CONF" "$sys" 2>/dev/null; then
    say "linked $sys -> $CONF"
  else
    say "cannot link $sys (not root?): use: export SLURM_CONF=$CONF"
  fi
}

# ---- the daemons --------------------------------------------------------------------------------
start_munged() {
  [ -n "$(pid_of munged)" ] && return 0
  if [ ! -s "$STATE/munge/munge.key" ]; then
    mungekey --create --keyfile="$STATE/munge/munge.key" 2>/dev/null \
      || dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge/munge.key"
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.pid" \
    --log-file="$LOG/munged.log" --seed-file="$STATE/munge/munged.seed"
  wait_for 20 munged timeout 10 bash -c "munge -n -S '$MUNGE_SOCKET' | unmunge -S '$MUNGE_SOCKET'"
  say "munged up (pid $(pid_of munged))"
}

start_mariadbd() {
  [ -n "$(pid_of mariadbd)" ] && return 0
  local fresh=0
  if [ ! -d "$STATE/db/mysql" ]; then
    fresh=1
    rm -rf "$STATE/db"
    mariadb-install-db --no-defaults --user=root --datadir="$STATE/db" --auth-root-authentication-method=socket \
      --skip-test-db >"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  # setsid: a new session, so that the caller's terminal or process group does not take it down
  setsid mariadbd --no-defaults --user=root --datadir="$STATE/db" --socket="$DB_SOCKET" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadbd.pid" --log-error="$LOG/mariadbd.log" \
    --innodb-buffer-pool-size=64M --skip-log-bin </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadbd timeout 10 mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping
  wait_for 10 "mariadbd pid file" have_pid mariadbd
  if [ $fresh = 1 ]; then
    mariadb --no-defaults --socket="$DB_SOCKET" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$ETC/db_password")';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
EOF
  fi
  say "mariadbd up (pid $(pid_of mariadbd), port $DB_PORT)"
}

start_slurmdbd() {
  [ -n "$(pid_of slurmdbd)" ] && return 0
  slurmdbd
  wait_for 60 slurmdbd timeout 10 sacctmgr -n -i list cluster
  say "slurmdbd up (pid $(pid_of slurmdbd))"
}

start_slurmctld() {
  [ -n "$(pid_of slurmctld)" ] && return 0
  slurmctld -f "$CONF"
  wait_for 60 slurmctld timeout 10 bash -c "scontrol ping | grep -q 'is UP'"
  say "slurmctld up (pid $(pid_of slurmctld))"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

node_ready() {
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

start_slurmd() {
  if [ -z "$(pid_of slurmd)" ]; then
    slurmd -f "$CONF"
  fi
  local t=0
  until node_ready; do
    sleep 0.2
    t=$((t + 1))
    case "$(node_state)" in  # a node drained or downed by an earlier life of this cluster
      *drain* | down*)
        if [ $((t % 25)) -eq 0 ]; then
          scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        fi
        ;;
    esac
    [ $t -lt 300 ] || die "node did not become idle within 60 s (state: $(node_state); logs: $LOG)"
  done
  say "slurmd up (pid $(pid_of slurmd)), node $(hostname -s): $(node_state), $(sinfo -h -N -o %c) CPUs"
}

all_running() {
  local d
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    [ -n "$(pid_of $d)" ] || return 1
  done
}

cmd_start() {
  local t0=$SECONDS
  install_packages
  mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/munge" "$STATE/ctld" "$STATE/slurmd"
  chmod 700 "$STATE/munge"
  if all_running && node_ready; then
    say "already running ($(node_state)); SLURM_CONF=$CONF"
    link_system_conf
    return 0
  fi
  [ -s "$ETC/db_password" ] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/db_password")
  # the configuration is rewritten only while the controller is down
  [ -n "$(pid_of slurmctld)" ] || write_config
  link_system_conf
  start_munged
  start_mariadbd
  start_slurmdbd
  start_slurmctld
  start_slurmd
  say "started in $((SECONDS - t0)) s; SLURM_CONF=$CONF"
}

cmd_stop() {
  if [ -n "$(pid_of slurmctld)" ]; then
    local jobs t=0
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      say "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      while [ -n "$(squeue -h -o %A 2>/dev/null)" ] && [ $t -lt 150 ]; do
        sleep 0.2
        t=$((t + 1))
      done
    fi
  fi
  local d
  for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_pid "$d"
  done
}

cmd_status() {
  local d pid rc=0
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    pid=$(pid_of "$d")
    if [ -n "$pid" ]; then
      printf '%-10s running (pid %s)\n' "$d" "$pid"
    else
      printf '%-10s stopped\n' "$d"
      rc=3
    fi
  done
  echo "state: $STATE; SLURM_CONF=$CONF"
  if [ -n "$(pid_of slurmctld)" ]; then
    sinfo -N -o "%N %T %c %m" 2>/dev/null || true
    squeue 2>/dev/null || true
  fi
  return $rc
}

cmd_reset() {
  cmd_stop
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  # controller state and accounting DB go together: job ids restart, so keeping either would mix lives
  rm -rf "$STATE"
  say "removed $STATE"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  reset) cmd_reset ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 start|stop|status|reset|env" >&2
    exit 2
    ;;
esac
