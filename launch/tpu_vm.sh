#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (or of several slices: multislice): creates the
# slice unless it is up (directly, or through a queued resource, Spot or not), copies this checkout to
# every worker, installs it in a venv there (launch/requirements-tpu.txt), runs a setup command (assets
# from a bucket), then starts COMMAND on every worker, detached from this ssh session (setsid nohup; its
# output in LOG_DIR/NAME.log on each worker, its exit status in LOG_DIR/NAME.exit). JAX's multi-controller
# runtime needs one process per worker; jax.distributed.initialize() finds the coordinator itself on TPU
# VMs (across slices too), so the command needs no distributed flags. Use a gs:// --workdir: the workers
# share nothing else.
#
# --watch stays and polls: a slice that was preempted is deleted, created again, set up again and the
# command resubmitted; a job that exited with the preemption code (75: it saved a checkpoint on SIGTERM)
# is resubmitted; the watch ends with the job's exit status. The command resumes from the workdir.
#
#   launch/tpu_vm.sh --name palr-v5e --zone us-west4-a --type v5litepod-16 --queued --spot --watch \
#     --setup-command 'gcloud storage cp -r gs://BUCKET/Llama-2-7b-hf gs://BUCKET/ml-1m assets/' -- \
#     python -m palr_jax.main --config configs/ml1m_llama2_7b.py:v5e-16 --workdir gs://BUCKET/palr/ml1m
#   launch/tpu_vm.sh --name palr-v5e --zone us-west4-a --delete      # delete the slice
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] [-- COMMAND...]

With COMMAND: bring the slice NAME up (create it, or re-create it when preempted), copy and install this
checkout on every worker, run the setup command, then start COMMAND on all workers (in the remote
checkout, its venv active) detached, and return (or stay, with --watch). Without COMMAND: bring up and
install only; with --delete and no COMMAND: delete the slice only.

  --name NAME           TPU VM name; with --queued the queued resource's name too (required)
  --zone ZONE           Cloud zone, e.g. us-central2-b (v4), us-west4-a (v5e) (required)
  --type TYPE           accelerator type for creation: v4-32, v5litepod-16, v5p-32, v6e-16 ...
  --version VERSION     TPU software version (default from --type: v4 tpu-ubuntu2204-base,
                        v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project PROJECT     gcloud project (default: gcloud's configured project)
  --spot                a Spot slice (preemptible; the job resumes from its checkpoints)
  --queued              create through a queued resource (gcloud compute tpus queued-resources): waits
                        for capacity instead of failing when the zone has none
  --slices N            multislice: N slices of TYPE (a queued resource with N nodes NAME-0 ... NAME-N-1,
                        implies --queued); adds --config.mesh.dcn_data=N to COMMAND unless it sets it
  --setup-command CMD   run on every worker after installing (in the remote checkout), e.g. copying the
                        model and data from a bucket; rerun whenever the slice is created again
  --log-dir DIR         where each worker keeps the job's output and exit status (default logs, in the
                        remote checkout)
  --attach              run COMMAND in this ssh session and stream its output instead of detaching it
  --watch               after starting COMMAND, poll the slice and the job every --poll seconds: recreate,
                        set up and resubmit after a preemption; exit with the job's exit status
  --poll SECONDS        polling interval of --watch and of waiting for a slice (default 60)
  --max-restarts N      --watch gives up after N resubmissions (default 20)
  --python PYTHON       Python (>= 3.11) on the workers for the venv (default python3.11; apt-installed
                        when missing)
  --no-setup            skip copying, installing and the setup command (the workers have them already)
  --log FILE            with --attach: also append the streamed output to FILE
  --delete              delete the slice at the end (with --watch or --attach: when the job ends, also
                        when it fails)
  --dry-run             print the commands that create, change or run something instead of running them;
                        the slice's and the job's state are still asked of gcloud (printed as # lines)
  -h, --help            this message
EOF
}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

name='' zone='' type='' version='' project='' spot=0 queued=0 slices=1 setup_command='' log_dir=logs
attach=0 watch=0 poll=60 max_restarts=20 python=python3.11 setup=1 log='' delete=0 dry_run=0
while (($#)); do
  case $1 in
    --name|--zone|--type|--version|--project|--slices|--setup-command|--log-dir|--poll|--max-restarts|\
    --python|--log)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2;; --zone) zone=$2;; --type) type=$2;; --version) version=$2;;
        --project) project=$2;; --slices) slices=$2;; --setup-command) setup_command=$2;;
        --log-dir) log_dir=$2;; --poll) poll=$2;; --max-restarts) max_restarts=$2;;
        --python) python=$2;; --log) log=$2;;
      esac
      shift 2;;
    --spot) spot=1; shift;;
    --queued) queued=1; shift;;
    --attach) attach=1; shift;;
    --watch) watch=1; shift;;
    --no-setup) setup=0; shift;;
    --delete) delete=1; shift;;
    --dry-run) dry_run=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; break;;
    *) die "unknown option '$1'";;
  esac
done
command=("$@")
[[ -n $name ]] || die '--name is required'
[[ -n $zone ]] || die '--zone is required'
for value in "$slices" "$poll" "$max_restarts"; do
  [[ $value =~ ^[0-9]+$ ]] || die "--slices, --poll and --max-restarts take whole numbers, got '$value'"
done
((slices >= 1)) || die '--slices must be at least 1'
((slices == 1)) || queued=1
((watch && attach)) && die '--watch needs a detached job: drop --attach'
((watch && ${#command[@]} == 0)) && die '--watch needs a COMMAND'
[[ -z $log || $attach == 1 ]] || die '--log streams the output: it needs --attach'
if ((delete && ${#command[@]} && !watch && !attach)); then
  die '--delete after a detached COMMAND would delete the slice under it: add --watch (or --attach)'
fi

if [[ -z $version && -n $type ]]; then
  case $type in
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite;;
    v5p-*) version=v2-alpha-tpuv5;;
    v6e-*) version=v2-alpha-tpuv6e;;
    *) die "no default --version for --type '$type': pass --version";;
  esac
fi

# Multislice: every slice's mesh axis dcn_data is the slice count (palr_jax/sharding.py).
if ((slices > 1 && ${#command[@]})); then
  dcn=''
  for word in "${command[@]}"; do
    [[ $word == --config.mesh.dcn_data=* ]] && dcn=${word#*=}
  done
  if [[ -z $dcn ]]; then
    command+=("--config.mesh.dcn_data=$slices")
  elif [[ $dcn != "$slices" ]]; then
    die "--slices $slices but COMMAND sets --config.mesh.dcn_data=$dcn"
  fi
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
archive=${TMPDIR:-/tmp}/palr-jax-$name.tar.gz
remote_dir=palr-jax
nodes=("$name")
if ((slices > 1)); then
  nodes=()
  for ((i = 0; i < slices; i++)); do nodes+=("$name-$i"); done
fi

exec 3>&1  # the transcript of --dry-run, also from inside $(...)
# Every step that creates, changes or runs something is one shell line: printed under --dry-run, else
# run. What is printed is what runs. Questions (the slice's state, the job's exit status) always run.
step() { if ((dry_run)); then printf '%s\n' "$1"; else bash -o pipefail -c "$1"; fi; }
ask() {  # ask LINE: its output ('' when it fails), also printed as a comment under --dry-run
  local out
  out=$(bash -c "$1" 2>/dev/null) || out=''
  ((dry_run)) && printf '# %s -> %s\n' "$1" "${out:-(nothing)}" >&3
  printf '%s' "$out"
}
on_nodes() {  # on_nodes WORKER COMMAND: ssh COMMAND to WORKER (all, 0) of every node
  local node
  for node in "${nodes[@]}"; do
    step "$(join "${tpu[@]}" ssh "$node" "${where[@]}" --worker="$1" --command "$2")"
  done
}

slice_state() {  # READY/ACTIVE when usable, PREEMPTED & co. when lost, '' when it does not exist
  if ((queued)); then
    ask "$(join "${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)')"
  else
    ask "$(join "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)')"
  fi
}

create_slice() {
  [[ -n $type ]] || die "the slice $name is not up; pass --type to create it"
  local create
  if ((queued)); then
    create=("${qr[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --runtime-version="$version")
    if ((slices > 1)); then create+=(--node-count="$slices" --node-prefix="$name"); else create+=(--node-id="$name"); fi
  else
    create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
  fi
  ((spot)) && create+=(--spot)
  step "$(join "${create[@]}")"
}

delete_slice() {
  if ((queued)); then
    step "$(join "${qr[@]}" delete "$name" "${where[@]}" --force --quiet)"
  else
    step "$(join "${tpu[@]}" delete "$name" "${where[@]}" --quiet)"
  fi
}

# Brings the slice up: reused when READY/ACTIVE, created when missing, deleted and created when lost;
# waits while it is being created or waits for capacity. Returns 1 when it had to (re)create it.
up() {
  local state created=0
  while :; do
    state=$(slice_state)
    case $state in
      READY|ACTIVE) return $created;;
      '') create_slice; created=1;;
      PREEMPTED|TERMINATED|SUSPENDED|FAILED) delete_slice; create_slice; created=1;;
      *) echo "tpu_vm.sh: $name is $state; waiting" >&2;;
    esac
    ((dry_run && created)) && return 1  # nothing was created: do not wait for it
    sleep "$poll"
  done
}

install() {
  ((setup)) || return 0
  step "$(join tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude=cache \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .)"
  local node
  for node in "${nodes[@]}"; do
    step "$(join "${tpu[@]}" scp "$archive" "$node:$remote_dir.tar.gz" "${where[@]}" --worker=all)"
  done
  local py lines
  py=$(quote "$python")
  lines="set -e; command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q"
  lines+=" $py $py-venv; }; mkdir -p $remote_dir && tar -xzf $remote_dir.tar.gz -C $remote_dir"
  lines+=" && cd $remote_dir && { [ -x .venv/bin/python ] || $py -m venv .venv; }"
  lines+=" && .venv/bin/pip install -q -r launch/requirements-tpu.txt"
  lines+=" && .venv/bin/pip install -q --no-deps -r requirements-assets.txt"
  lines+=" && .venv/bin/pip install -q --no-deps -e ."
  on_nodes all "$lines"
  [[ -z $setup_command ]] || on_nodes all "set -e; cd $remote_dir && $setup_command"
}

logs=$(quote "$log_dir")/$(quote "$name")
submit() {  # COMMAND on every worker, detached: it outlives this ssh session and this script
  local job="$(join "${command[@]}"); echo \$? > $logs.exit"
  on_nodes all "set -e; cd $remote_dir && . .venv/bin/activate && mkdir -p $(quote "$log_dir") && rm -f $logs.exit \
&& { setsid nohup bash -c $(quote "$job") > $logs.log 2>&1 < /dev/null & }"
}

job_status() {  # the exit status of the job on worker 0 of the first slice ('' while it runs)
  local status=$logs.exit
  [[ $log_dir == /* ]] || status=$remote_dir/$status
  ask "$(join "${tpu[@]}" ssh "${nodes[0]}" "${where[@]}" --worker=0 --command "cat $status 2>/dev/null")"
}

if ((${#command[@]} == 0 && delete)); then
  delete_slice
  exit
fi

up || setup=1  # a new slice has nothing installed
install

((${#command[@]})) || exit 0
if ((attach)); then
  remote="set -o pipefail; cd $remote_dir && . .venv/bin/activate && $(join "${command[@]}") 2>&1"
  remote+=" | sed -u \"s/^/[\$(hostname)] /\""
  ((delete)) && trap delete_slice EXIT  # also after a failure or Ctrl-C
  for node in "${nodes[@]}"; do
    line="$(join "${tpu[@]}" ssh "$node" "${where[@]}" --worker=all --command "$remote")"
    [[ -n $log ]] && line+=" 2>&1 | tee -a $(quote "$log")"
    step "$line"
  done
  exit
fi

submit
if ((!watch)); then
  echo "tpu_vm.sh: started on every worker; output in ~/$remote_dir/$log_dir/$name.log" >&2
  exit 0
fi
((delete)) && trap delete_slice EXIT
restarts=0
resubmit() {
  ((++restarts <= max_restarts)) || { echo "tpu_vm.sh: $max_restarts resubmissions; giving up" >&2; exit 1; }
  echo "tpu_vm.sh: $1; resubmitting ($restarts of at most $max_restarts)" >&2
}
while :; do
  sleep "$poll"
  state=$(slice_state)
  case $state in
    READY|ACTIVE)
      status=$(job_status)
      case $status in
        '') ;;
        0) echo "tpu_vm.sh: the job finished" >&2; exit 0;;
        75) resubmit 'the job saved a checkpoint on SIGTERM (exit 75)'; submit;;
        *) echo "tpu_vm.sh: the job failed with exit status $status" >&2; exit "$status";;
      esac;;
    ''|PREEMPTED|TERMINATED|SUSPENDED|FAILED)
      resubmit "the slice is ${state:-gone}"
      [[ -z $state ]] || delete_slice
      setup=1
      up || true
      install
      submit;;
    *) ;;  # being created, repaired or waiting for capacity
  esac
done
