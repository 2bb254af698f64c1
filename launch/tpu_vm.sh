#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice: creates the slice (or reuses it), copies this
# checkout to every worker, installs it in a venv there (launch/requirements-tpu.txt), runs the command
# with --worker=all and streams every worker's output here, each line prefixed with its host name.
# JAX's multi-controller runtime needs one process per worker; jax.distributed.initialize() finds the
# coordinator itself on TPU VMs, so the command needs no distributed flags. Use a gs:// --workdir: the
# workers share nothing else.
#
#   launch/tpu_vm.sh --name palr-v4 --zone us-central2-b --type v4-32 -- \
#     python -m palr_jax.main --config configs/ml1m_llama2_7b.py:v4-32 --workdir gs://BUCKET/palr/ml1m
#   launch/tpu_vm.sh --name palr-v4 --zone us-central2-b --delete      # delete the slice
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE [options] [-- COMMAND...]

With COMMAND: create the TPU VM slice NAME unless it exists, copy and install this checkout on every
worker, run COMMAND on all workers (in the remote checkout, its venv active), stream the output.
Without COMMAND: create + install only; with --delete and no COMMAND: delete the slice only.

  --name NAME          TPU VM name (required)
  --zone ZONE          Cloud zone, e.g. us-central2-b (v4), us-west4-a (v5e) (required)
  --type TYPE          accelerator type for creation: v4-32, v5litepod-16, v5p-32, v6e-16 ...
  --version VERSION    TPU software version (default from --type: v4 tpu-ubuntu2204-base,
                       v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project PROJECT    gcloud project (default: gcloud's configured project)
  --spot               create a Spot slice (preemptible; training resumes from its checkpoints)
  --python PYTHON      Python (>= 3.11) on the workers for the venv (default python3.11; apt-installed
                       when missing)
  --no-setup           skip copying and installing (the workers already have this checkout)
  --log FILE           also append the streamed output to FILE
  --delete             delete the slice at the end (also when COMMAND fails)
  --dry-run            print the commands instead of running them
  -h, --help           this message
EOF
}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Every step is one shell line: printed under --dry-run, else run. What is printed is what runs.
step() { if ((dry_run)); then printf '%s\n' "$1"; else bash -o pipefail -c "$1"; fi; }

name='' zone='' type='' version='' project='' spot=0 python=python3.11 setup=1 log='' delete=0 dry_run=0
while (($#)); do
  case $1 in
    --name|--zone|--type|--version|--project|--python|--log)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --name) name=$2;; --zone) zone=$2;; --type) type=$2;; --version) version=$2;;
        --project) project=$2;; --python) python=$2;; --log) log=$2;;
      esac
      shift 2;;
    --spot) spot=1; shift;;
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

if [[ -z $version && -n $type ]]; then
  case $type in
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite;;
    v5p-*) version=v2-alpha-tpuv5;;
    v6e-*) version=v2-alpha-tpuv6e;;
    *) die "no default --version for --type '$type': pass --version";;
  esac
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")
archive=${TMPDIR:-/tmp}/palr-jax-$name.tar.gz
remote_dir=palr-jax

delete_slice() { step "$(join "${tpu[@]}" delete "$name" "${where[@]}" --quiet)"; }

if ((${#command[@]} == 0 && delete)); then
  delete_slice
  exit
fi

# Reuse the slice when it exists (describe succeeds), else create it (needs --type).
describe="$(join "${tpu[@]}" describe "$name" "${where[@]}")"
if [[ -n $type ]]; then
  create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version")
  ((spot)) && create+=(--spot)
  step "$describe >/dev/null 2>&1 || $(join "${create[@]}")"
else
  step "$describe >/dev/null"
fi

if ((setup)); then
  step "$(join tar -czf "$archive" -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude=cache \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .)"
  step "$(join "${tpu[@]}" scp "$archive" "$name:$remote_dir.tar.gz" "${where[@]}" --worker=all)"
  py=$(quote "$python")
  install="set -e; command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q"
  install+=" $py $py-venv; }; mkdir -p $remote_dir && tar -xzf $remote_dir.tar.gz -C $remote_dir"
  install+=" && cd $remote_dir && { [ -x .venv/bin/python ] || $py -m venv .venv; }"
  install+=" && .venv/bin/pip install -q -r launch/requirements-tpu.txt"
  install+=" && .venv/bin/pip install -q --no-deps -r requirements-assets.txt"
  install+=" && .venv/bin/pip install -q --no-deps -e ."
  step "$(join "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install")"
fi

if ((${#command[@]})); then
  remote="set -o pipefail; cd $remote_dir && . .venv/bin/activate && $(join "${command[@]}") 2>&1"
  remote+=" | sed -u \"s/^/[\$(hostname)] /\""
  line="$(join "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote")"
  [[ -n $log ]] && line+=" 2>&1 | tee -a $(quote "$log")"
  ((delete)) && trap delete_slice EXIT  # also after a failure or Ctrl-C
  step "$line"
fi
