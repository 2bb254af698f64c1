#!/usr/bin/env bash
# Runs a command on this machine in the project's venv: as one process, or as N processes joined by
# jax.distributed over 127.0.0.1 (the multi-process code path of a pod, on CPU devices), e.g.
#
#   launch/local.sh -- python -m palr_jax.main --config configs/ml100k.py:quick --workdir runs/quick
#   launch/local.sh --processes 2 --cpu-devices 4 -- python -m palr_jax.main ... --workdir runs/mp
#
# Each process gets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by
# palr_jax/distributed.py); its output lines are prefixed with [process id].
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] -- COMMAND...

  --processes N       processes joined by jax.distributed on 127.0.0.1 (default 1: no coordinator)
  --cpu-devices N     run on CPU with N simulated devices per process (JAX_PLATFORMS=cpu,
                      JAX_NUM_CPU_DEVICES=N); default: whatever devices the machine has
  --port PORT         coordinator port with --processes > 1 (default 12355)
  --venv DIR          venv to activate (default: the repository's .venv)
  --dry-run           print the commands instead of running them
  -h, --help          this message
EOF
}

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
processes=1 cpu_devices='' port=12355 venv=$root/.venv dry_run=0
while (($#)); do
  case $1 in
    --processes|--cpu-devices|--port|--venv)
      (($# >= 2)) || die "$1 needs a value"
      case $1 in
        --processes) processes=$2;; --cpu-devices) cpu_devices=$2;; --port) port=$2;; --venv) venv=$2;;
      esac
      shift 2;;
    --dry-run) dry_run=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; break;;
    *) die "unknown option '$1'";;
  esac
done
(($#)) || die 'no COMMAND after --'
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes must be a positive integer, got '$processes'"
[[ -z $cpu_devices || $cpu_devices =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer"

envs=()
[[ -n $cpu_devices ]] && envs+=(JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$cpu_devices")
activate=". $(quote "$venv/bin/activate") && exec"

if ((processes == 1)); then
  line="$activate $(join env "${envs[@]}" "$@")"
  if ((dry_run)); then printf '%s\n' "$line"; exit; fi
  exec bash -c "$line"
fi

lines=()
for ((i = 0; i < processes; i++)); do
  lines+=("$activate $(join env JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$processes" \
    JAX_PROCESS_ID="$i" "${envs[@]}" "$@")")
done
if ((dry_run)); then printf '%s\n' "${lines[@]}"; exit; fi

# Each process leads its own process group (setsid), its lines prefixed with its id; the first failure,
# or Ctrl-C, stops the others, and the exit status is the first failure's. SIGTERM is passed on to every
# process and waited for: the job exits 75 (palr_jax.distributed: preempted, the same command resumes).
pids=()
stop() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
interrupted=0
trap 'stop; exit 130' INT
trap 'interrupted=1; stop' TERM
for i in "${!lines[@]}"; do
  # Only the process acts on SIGTERM: its wrapper shell and the prefixing sed outlive it, to pass on its
  # last lines and its exit status.
  setsid bash -c "trap : TERM; set -o pipefail; { ${lines[$i]}; } 2>&1 | (trap '' TERM; exec sed -u 's/^/[$i] /')" &
  pids+=($!)
done
rc=0 left=${#pids[@]}
while ((left)); do
  wait -n && code=0 || code=$?
  if ((interrupted)); then interrupted=0; continue; fi  # the TERM trap cut the wait short: wait again
  ((code == 127)) && break                              # no process left
  ((left--))
  ((code)) || continue
  ((rc)) || rc=$code
  stop
done
exit $rc
