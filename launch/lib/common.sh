# shellcheck shell=bash
# Helpers shared by the launch scripts: messages, shell quoting, option parsing and the
# supervision of parallel jobs. Sourcing this file only defines functions (no variables, traps
# or output), so each script keeps its own `set` options and state.
#
# The caller sets PROG (its name, used in every message) and defines usage() (printed by
# --help). slurm.sbatch does not source this file: sbatch runs a copy of the script from its
# spool directory, where this library cannot be found next to it.

# ------------------------------------------------------------------ messages
die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Our own progress messages. They go to fd 3 once supervise_init has made it a copy of stderr
# (the `wait` calls of supervise_jobs silence fd 2 while traps that log may run), else to fd 2.
log() { echo "$PROG: $*" >&"${sup_log_fd:-2}"; }

# ------------------------------------------------------------------ values
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# check_positive WHAT VALUE: dies unless VALUE is an integer >= 1 (WHAT names it in the error).
check_positive() {
  { is_uint "$2" && (($2 >= 1)); } || die "$1 must be a positive integer, got '$2'"
}

# check_seconds OPTION VALUE: dies unless VALUE is a whole number of seconds (OPTION without --).
check_seconds() {
  is_uint "$2" || die "--$1 must be a whole number of seconds, got '$2'"
}

check_port() {
  { is_uint "$1" && (($1 >= 1 && $1 <= 65535)); } || die "--port must be in 1..65535, got '$1'"
}

# Joins words shell-quoted (POSIX single quotes where needed, readable and safe for a remote
# shell too), so that the printed line runs the same command when pasted.
quote_cmd() {
  local word out=() sq="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/$sq}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# ------------------------------------------------------------------ options
need_value() { (($1 >= 2)) || die "$2 needs a value"; }

# parse_args VALUE_OPTS FLAG_OPTS POSITIONAL ARG...
#   VALUE_OPTS  space-separated names of the options that take a value: '--NAME V' and
#               '--NAME=V' both set the caller's variable NAME to V;
#   FLAG_OPTS   space-separated names of the flags: '--NAME' sets the variable NAME to 1;
#   POSITIONAL  the variable that takes the one positional argument, or '' if there is none.
# '-h'/'--help' prints usage and exits 0; the arguments after '--' are left in the global array
# train_args. Anything else exits 2 with a message naming it: 'unknown option' or 'unexpected
# argument' when the script takes a positional argument, 'unknown argument' otherwise.
parse_args() {
  local _values=" $1 " _flags=" $2 " _positional=$3 _name _hint
  shift 3
  _hint="(arguments for warm_jax.train go after '--')"
  while (($#)); do
    _name=${1#--}
    _name=${_name%%=*}
    # The name is checked to be an identifier before the lookups, so that neither the word
    # match nor printf -v can be fooled by spaces or other characters in an argument.
    if [[ $1 == --* && $_name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      if [[ $_values == *" $_name "* ]]; then
        if [[ $1 == *=* ]]; then
          printf -v "$_name" '%s' "${1#*=}"
          shift
        else
          need_value $# "$1"
          printf -v "$_name" '%s' "$2"
          shift 2
        fi
        continue
      fi
      if [[ $_flags == *" $_name "* && $1 != *=* ]]; then
        printf -v "$_name" '%s' 1
        shift
        continue
      fi
    fi
    case $1 in
      -h | --help) usage; exit 0 ;;
      --) shift; break ;;
    esac
    [[ -n $_positional ]] || die "unknown argument '$1' $_hint"
    [[ $1 != -* ]] || die "unknown option '$1' $_hint"
    [[ -z ${!_positional:-} ]] || die "unexpected argument '$1' $_hint"
    printf -v "$_positional" '%s' "$1"
    shift
  done
  # shellcheck disable=SC2034  # the caller's output
  train_args=("$@")
}

# ------------------------------------------------------------------ supervision
# Runs commands in parallel as background jobs, prefixes their output lines with a label,
# stops all when one fails or when the script gets SIGINT/SIGTERM, escalates to SIGKILL after a
# grace period, and reports the exit statuses. Each job is its own process group (`set -m`),
# so that a signal reaches the whole pipeline 'command | prefixer'; the prefixer ignores the
# signals so that the last lines of a stopping command are not lost.
#
# State, global (the traps need it): job_pids[i] / job_status[i] ('' while running) of the jobs
# of the current supervise_jobs call, sup_stopping (1 once a stop began), sup_interrupted (130
# or 143 after SIGINT or SIGTERM, else 0).

# supervise_init NOUN KILL_AFTER [SIGNAL_HOOK]
#   NOUN         what the jobs are, for messages ('processes', 'hosts');
#   KILL_AFTER   seconds between the stop signal and SIGKILL;
#   SIGNAL_HOOK  a function called as 'HOOK SIG' before the running jobs are signalled; when it
#                returns non-zero the local jobs are left alone (the hook handled the signal).
# Installs the INT/TERM/USR1 traps; call it once, after --dry_run has been dealt with.
supervise_init() {
  sup_noun=$1
  sup_kill_after=$2
  sup_signal_hook=${3:-}
  sup_stopping=0
  sup_interrupted=0
  sup_watchdog=""
  job_pids=()
  job_status=()
  set -m
  exec 3>&2
  sup_log_fd=3
  trap 'on_signal INT' INT
  trap 'on_signal TERM' TERM
  trap 'log "$sup_noun still running ${sup_kill_after}s after the stop signal, killing them"; signal_running KILL' USR1
}

prefix_lines() {
  trap '' INT TERM
  local line
  while IFS= read -r line || [[ -n $line ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

# run_one LABEL CMD_LINE: runs the shell-quoted CMD_LINE with its output prefixed [LABEL] and
# exits with the command's status.
run_one() {
  # A handler (not an ignore) keeps this subshell alive until the command has exited,
  # while the command itself still gets the default dispositions on exec.
  trap ':' INT TERM
  exec 3>&-
  local label=$1 cmd_line=$2 rc
  set +e
  # exec: no intermediate shell between the pipe and the command, so the command's own exit
  # status (or signal) is what PIPESTATUS reports.
  eval "exec $cmd_line" 2>&1 | prefix_lines "$label"
  rc=${PIPESTATUS[0]}
  exit "$rc"
}

# signal_running SIG: sends SIG to every job that has not finished.
signal_running() {
  local sig=$1 i
  if [[ -n $sup_signal_hook ]] && ! "$sup_signal_hook" "$sig"; then
    return 0
  fi
  for i in "${!job_pids[@]}"; do
    [[ -n ${job_status[i]} ]] || kill -s "$sig" -- "-${job_pids[i]}" 2>/dev/null || true
  done
}

# stop_all SIG: signals the running jobs, and SIGKILLs them if they are still running after
# KILL_AFTER seconds or when stop_all is called again.
stop_all() {
  if ((sup_stopping)); then
    signal_running KILL
    return
  fi
  sup_stopping=1
  signal_running "$1"
  # Processes blocked in a collective may not react to SIGTERM; escalate after a while.
  (sleep "$sup_kill_after" && kill -s USR1 $$) &
  sup_watchdog=$!
}

# shellcheck disable=SC2317,SC2034  # invoked from the traps; sup_interrupted is for the caller
on_signal() {
  log "got SIG$1, stopping all $sup_noun"
  [[ $1 == INT ]] && sup_interrupted=130 || sup_interrupted=143
  stop_all "$1"
}

# supervise_jobs SUMMARY: runs job i = the shell-quoted line job_cmds[i], output prefixed
# [job_labels[i]], all in parallel, and waits for all. The first failure (unless a stop is
# already under way) is logged as "job_failures[i] with exit status RC; stopping the others" and
# stops the rest. If any failed, logs "SUMMARY LABEL (exit RC) ..." and returns the first
# failure's status; returns 0 otherwise.
# shellcheck disable=SC2154  # job_cmds, job_labels and job_failures are the caller's input
supervise_jobs() {
  local summary=$1 i rc running first_failure="" failed=()
  job_pids=()
  job_status=()
  for i in "${!job_cmds[@]}"; do
    run_one "${job_labels[i]}" "${job_cmds[i]}" &
    job_pids[i]=$!
    job_status[i]=""
  done
  running=${#job_pids[@]}
  while ((running > 0)); do
    # Woken by any child or a trapped signal; statuses are collected below. stderr is dropped
    # because bash's own "Killed" job notices would interleave with the prefixed logs.
    { wait -n || true; } 2>/dev/null
    for i in "${!job_pids[@]}"; do
      [[ -z ${job_status[i]} ]] || continue
      kill -0 "${job_pids[i]}" 2>/dev/null && continue
      rc=0
      { wait "${job_pids[i]}" || rc=$?; } 2>/dev/null
      job_status[i]=$rc
      running=$((running - 1))
      if ((rc != 0)) && [[ -z $first_failure ]]; then
        first_failure=$rc
        if ((!sup_stopping)); then
          log "${job_failures[i]} with exit status $rc; stopping the others"
          stop_all TERM
        fi
      fi
    done
  done
  if [[ -n $sup_watchdog ]]; then
    kill -- "-$sup_watchdog" 2>/dev/null || true
    wait "$sup_watchdog" 2>/dev/null || true
    sup_watchdog=""
  fi
  for i in "${!job_status[@]}"; do
    ((job_status[i] == 0)) || failed+=("${job_labels[i]} (exit ${job_status[i]})")
  done
  if ((${#failed[@]})); then
    log "$summary ${failed[*]}"
    return "$first_failure"
  fi
  return 0
}
