#!/usr/bin/env bash
# Runs `python -m warm_jax.train` on several GPU VMs over ssh, one process per VM (each
# process drives all GPUs of its VM), joined by jax.distributed with the first host as
# coordinator. Phases, each on all hosts in parallel and each finished before the next:
# ship the code (rsync), install (optional), train.
set -euo pipefail

readonly PROG=${0##*/}
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly PID_FILE=.warm_jax_train.pid

usage() {
  cat <<EOF
Usage: $PROG --hosts h1,h2,... [--port P] [--user U] [--workdir_remote DIR]
       [--coordinator_host H] [--python PY] [--install] [--kill_after S] [--dry_run] -- ARGS...

Ships this repository to every host with rsync and runs there, in DIR,
  JAX_COORDINATOR_ADDRESS=h1:P JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i PY -m warm_jax.train ARGS
with i the host's position in --hosts (warm_jax.runtime reads these variables). Output lines
are prefixed with [host]. When one host fails, the processes on the others are stopped.

Options:
  --hosts h1,h2,...       hosts, comma-separated; the first runs the coordinator (process 0)
  --port P                coordinator port on h1 (default: \$WARM_COORDINATOR_PORT, else 12355)
  --user U                ssh/rsync login user (default: ssh's own default)
  --workdir_remote DIR    code directory on the hosts, absolute or relative to the login
                          home; its parent must exist (default: warm_jax). Relative paths in
                          ARGS (e.g. --workdir) are relative to it.
  --coordinator_host H    address of h1 as the other hosts reach it, when it differs from the
                          name used for ssh (e.g. an internal IP) (default: h1)
  --python PY             python on the hosts (default: python3)
  --install               before training, run 'PY -m pip install -e . jax[cuda12]' on each host
  --kill_after S          seconds between SIGTERM and SIGKILL when stopping (default 30)
  --dry_run               print every command, one per line, and exit 0
  -h, --help              this text

ssh runs with BatchMode=yes: set up keys (or ssh-agent) and host names in ~/.ssh/config first.

Example:
  $PROG --hosts gpu-a,gpu-b --install -- --gin_file=gin/repro.gin --gin_file=gin/mesh/gpu.gin \\
      --workdir=runs/repro
EOF
}

hosts=""
port=${WARM_COORDINATOR_PORT:-12355}
user=""
workdir_remote=warm_jax
coordinator_host=""
python=python3
install=0
kill_after=30
dry_run=0
parse_args "hosts port user workdir_remote coordinator_host python kill_after" "install dry_run" "" "$@"

[[ -n $hosts ]] || die "--hosts is required"
IFS=, read -r -a host_list <<<"$hosts"
declare -A seen=()
for h in "${host_list[@]}"; do
  [[ $h =~ ^[A-Za-z0-9._:-]+$ ]] || die "--hosts: bad host name '$h' in '$hosts'"
  [[ -z ${seen[$h]:-} ]] || die "--hosts: '$h' appears twice; run one process per host"
  seen[$h]=1
done
check_port "$port"
check_seconds kill_after "$kill_after"
[[ -n $workdir_remote ]] || die "--workdir_remote must not be empty"
[[ $workdir_remote != '~'* ]] || die "--workdir_remote: give a path relative to the home directory instead of '~'"
num_hosts=${#host_list[@]}
coordinator="${coordinator_host:-${host_list[0]}}:$port"

ssh_cmd=(ssh -o BatchMode=yes -o ServerAliveInterval=30)
target() { printf '%s\n' "${user:+$user@}$1"; }
q_dir=$(quote_cmd "$workdir_remote")

# Phase commands, one per host, as shell-quoted lines: printed by --dry_run, eval'ed otherwise.
sync_cmds=()
install_cmds=()
run_cmds=()
for i in "${!host_list[@]}"; do
  t=$(target "${host_list[i]}")
  # The .gitignore filter keeps local work directories and caches off the wire.
  sync_cmds+=("$(quote_cmd rsync -az --exclude=.git --filter=':- .gitignore' \
    -e "${ssh_cmd[*]}" "$ROOT/" "$t:$workdir_remote/")")
  install_cmds+=("$(quote_cmd "${ssh_cmd[@]}" "$t" \
    "cd $q_dir && $(quote_cmd "$python" -m pip install -e . 'jax[cuda12]>=0.10,<0.11')")")
  # The remote shell writes its pid and then becomes python (exec), so that a stop request
  # can signal exactly that process: ssh without a tty does not forward signals.
  run_cmds+=("$(quote_cmd "${ssh_cmd[@]}" "$t" \
    "cd $q_dir && echo \$\$ > $PID_FILE && exec $(quote_cmd env "JAX_COORDINATOR_ADDRESS=$coordinator" \
      "JAX_NUM_PROCESSES=$num_hosts" "JAX_PROCESS_ID=$i" PYTHONUNBUFFERED=1 \
      "$python" -m warm_jax.train "${train_args[@]}")")")
done

if ((dry_run)); then
  printf '%s\n' "${sync_cmds[@]}"
  ((!install)) || printf '%s\n' "${install_cmds[@]}"
  printf '%s\n' "${run_cmds[@]}"
  exit 0
fi

# Supervision (lib/common.sh): one job per host and phase; a failure or a signal stops them all.
phase=""

# The signal hook of supervise_init. A local ssh that dies leaves its remote process running,
# so in the run phase the training processes on the hosts that have not finished are signalled
# through a second ssh, and the local ssh clients only get SIGKILL (they normally end by
# themselves once their remote process has).
# shellcheck disable=SC2317,SC2329  # invoked by name from signal_running (lib/common.sh)
signal_hosts() {
  local sig=$1 i t kills=()
  [[ $phase == run ]] || return 0
  for i in "${!job_pids[@]}"; do
    [[ -z ${job_status[i]} ]] || continue
    t=$(target "${host_list[i]}")
    # sshd starts the command as a session (and group) leader, so the group id is the pid
    # written at start: signalling the group also reaches data-loader workers.
    local remote="cd $q_dir && p=\$(cat $PID_FILE)"
    remote+=" && { kill -s $sig -- -\$p || kill -s $sig \$p; } 2>/dev/null || true"
    "${ssh_cmd[@]}" -o ConnectTimeout=10 "$t" "$remote" </dev/null >&3 2>&1 &
    kills+=($!)
  done
  for i in "${kills[@]}"; do wait "$i" 2>/dev/null || true; done
  [[ $sig == KILL ]]
}

# Runs one command per host in parallel; returns the first failing exit status (0 if none).
run_phase() {
  local i
  phase=$1
  shift
  job_cmds=("$@")
  job_labels=("${host_list[@]}")
  job_failures=()
  for i in "${!host_list[@]}"; do job_failures+=("$phase failed on ${host_list[i]} (process $i)"); done
  log "$phase on ${host_list[*]}"
  supervise_jobs "$phase failed:"
}

supervise_init hosts "$kill_after" signal_hosts
rc=0
run_phase sync "${sync_cmds[@]}" || rc=$?
if ((rc == 0 && install && !sup_stopping)); then run_phase install "${install_cmds[@]}" || rc=$?; fi
if ((rc == 0 && !sup_stopping)); then run_phase run "${run_cmds[@]}" || rc=$?; fi
((rc != 0)) || rc=$sup_interrupted
((rc != 0)) || log "all $num_hosts hosts finished"
exit "$rc"
