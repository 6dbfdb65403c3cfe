#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (directly or through a queued resource), ships this repository
# to every worker, installs it and runs `python -m warm_jax.train` on all workers at once.
# JAX finds the other workers of the slice by itself, so no coordinator flags are needed.
set -euo pipefail

readonly PROG=${0##*/}
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly REMOTE_DIR=warm_jax # relative to the login home on every worker
readonly REMOTE_TARBALL=warm_jax_src.tgz

usage() {
  cat <<EOF
Usage: $PROG --name NAME --zone ZONE --accelerator_type TYPE [--version V] [--queued]
       [--spot] [--project P] [--delete] [--dry_run] -- ARGS...
       $PROG --name NAME --zone ZONE [--queued] [--project P] --delete [--dry_run]

Steps (each printed before it runs):
  1. create the TPU VM 'NAME' (gcloud compute tpus tpu-vm create), or with --queued a queued
     resource 'NAME' for node 'NAME' (gcloud compute tpus queued-resources create) and wait
     until it is ACTIVE; an existing VM of that name is reused;
  2. pack the files git knows about (tracked, and untracked but not ignored) into a tarball
     and copy it to all workers (gcloud compute tpus tpu-vm scp --worker=all);
  3. unpack into ~/$REMOTE_DIR and pip install -e . with jax[tpu] on all workers;
  4. run 'python3 -m warm_jax.train ARGS' in ~/$REMOTE_DIR on all workers
     (gcloud compute tpus tpu-vm ssh --worker=all), output lines prefixed with [worker host];
  5. with --delete, delete the VM (or the queued resource) afterwards, whatever the result.
With --delete and no ARGS, only step 5 runs.

Options:
  --name NAME               TPU VM name (and queued resource id with --queued)
  --zone ZONE               e.g. us-west4-a (v5e), us-central2-b (v4)
  --accelerator_type TYPE   e.g. v5litepod-16, v4-32, v5p-8, v6e-8
  --version V               TPU software version (default by type: v2-alpha-tpuv5-lite for v5e,
                            v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e,
                            tpu-ubuntu2204-base otherwise)
  --queued                  use a queued resource (waits for capacity instead of failing)
  --spot                    ask for Spot capacity (preemptible; checkpoints make resume exact)
  --project P               Google Cloud project (default: gcloud's configured project)
  --delete                  delete the VM / queued resource after the run, or only that
  --poll_s S                seconds between queued resource state checks (default 30)
  --dry_run                 print the commands, one per line, and exit 0
  -h, --help                this text

Every worker writes its own local disk: point --workdir at a bucket (gs://...) or a shared
file system, so that checkpoints and reports are in one place.

Example:
  $PROG --name warm-v5e --zone us-west4-a --accelerator_type v5litepod-16 --queued --delete -- \\
      --gin_file=gin/repro.gin --gin_file=gin/mesh/tpu_pod.gin --workdir=gs://my-bucket/warm
EOF
}

default_version() {
  case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

name=""
zone=""
accelerator_type=""
version=""
queued=0
spot=0
project=""
delete=0
poll_s=30
dry_run=0
parse_args "name zone accelerator_type version project poll_s" "queued spot delete dry_run" "" "$@"

[[ -n $name ]] || die "--name is required"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$name': use lower-case letters, digits and '-', starting with a letter"
[[ -n $zone ]] || die "--zone is required"
check_seconds poll_s "$poll_s"
train=1
if ((${#train_args[@]} == 0)); then
  ((delete)) || die "nothing to do: give ARGS for warm_jax.train after '--', or --delete"
  train=0
fi
if ((train)); then
  [[ -n $accelerator_type ]] || die "--accelerator_type is required to create the TPU VM"
  version=${version:-$(default_version "$accelerator_type")}
fi

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
tarball="${TMPDIR:-/tmp}/warm_jax_src_${name}.tgz"

if ((queued)); then
  create_cmd=("${qr[@]}" create "$name" --node-id="$name" --accelerator-type="$accelerator_type"
    --runtime-version="$version" "${where[@]}")
  delete_cmd=("${qr[@]}" delete "$name" "${where[@]}" --force --quiet)
else
  create_cmd=("${tpu_vm[@]}" create "$name" --accelerator-type="$accelerator_type"
    --version="$version" "${where[@]}")
  delete_cmd=("${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet)
fi
((!spot)) || create_cmd+=(--spot)
describe_vm_cmd=("${tpu_vm[@]}" describe "$name" "${where[@]}" '--format=value(state)')
describe_qr_cmd=("${qr[@]}" describe "$name" "${where[@]}" '--format=value(state.state)')
# The files git knows about (tracked, or untracked and not ignored), NUL-separated so that
# any file name survives; tracked files deleted in the working tree are left out.
pack_line="cd $(quote_cmd "$ROOT") && git ls-files -z --cached --others --exclude-standard\
 | while IFS= read -r -d '' f; do if [ -e \"\$f\" ]; then printf '%s\\0' \"\$f\"; fi; done\
 | tar --null -czf $(quote_cmd "$tarball") -T -"
scp_cmd=("${tpu_vm[@]}" scp "$tarball" "$name:$REMOTE_TARBALL" --worker=all "${where[@]}")
install_remote="mkdir -p $REMOTE_DIR && tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR && cd $REMOTE_DIR\
 && $(quote_cmd python3 -m pip install -q -e . 'jax[tpu]>=0.10,<0.11')"
install_cmd=("${tpu_vm[@]}" ssh "$name" --worker=all "${where[@]}" --command="$install_remote")
# Each worker prefixes its lines with its host name (ending in -w-<worker number>), since
# gcloud interleaves the workers' output; pipefail keeps python's exit status.
run_remote="set -o pipefail; cd $REMOTE_DIR && $(quote_cmd env PYTHONUNBUFFERED=1 python3 -m warm_jax.train \
  "${train_args[@]}") 2>&1 | sed -u \"s/^/[\$(hostname)] /\""
run_cmd=("${tpu_vm[@]}" ssh "$name" --worker=all "${where[@]}" --command="$run_remote")

if ((dry_run)); then
  if ((train)); then
    quote_cmd "${create_cmd[@]}"
    if ((queued)); then
      echo "# then repeat every ${poll_s}s until it prints ACTIVE:"
      quote_cmd "${describe_qr_cmd[@]}"
    fi
    echo "$pack_line"
    quote_cmd "${scp_cmd[@]}"
    quote_cmd "${install_cmd[@]}"
    quote_cmd "${run_cmd[@]}"
  fi
  ((!delete)) || quote_cmd "${delete_cmd[@]}"
  exit 0
fi

# Runs a command after printing it, so that the log shows what was done.
run() {
  log "+ $(quote_cmd "$@")"
  "$@"
}

wait_until_active() {
  local state="" last=""
  while :; do
    state=$("${describe_qr_cmd[@]}") || die "could not describe queued resource '$name' in $zone"
    [[ $state == "$last" ]] || log "queued resource $name: $state"
    last=$state
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource '$name' is $state; see:" \
          "$(quote_cmd "${qr[@]}" describe "$name" "${where[@]}")" ;;
    esac
    sleep "$poll_s"
  done
}

train_and_run() {
  local existing
  if existing=$("${describe_vm_cmd[@]}" 2>/dev/null) && [[ -n $existing ]]; then
    log "TPU VM $name exists (state $existing); reusing it"
  else
    run "${create_cmd[@]}"
  fi
  ((!queued)) || wait_until_active
  log "+ $pack_line"
  command -v git >/dev/null || die "git is needed to list the files to ship"
  bash -c "set -o pipefail; $pack_line"
  run "${scp_cmd[@]}"
  run "${install_cmd[@]}"
  run "${run_cmd[@]}"
}

rc=0
# Ctrl-C or SIGTERM ends the current step (gcloud gets the signal too) but not this script,
# so that --delete still runs.
trap 'log "interrupted"' INT TERM
if ((train)); then
  # A subshell, so that a failed step (set -e) still reaches the deletion below.
  (train_and_run) || rc=$?
  rm -f "$tarball"
  ((rc == 0)) || log "failed with exit status $rc"
fi
if ((delete)); then
  run "${delete_cmd[@]}" || { log "deleting '$name' failed; delete it by hand to stop billing"; exit 1; }
fi
exit "$rc"
