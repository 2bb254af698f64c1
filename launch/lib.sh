# Shell helpers shared by the launchers (sourced, not run).

die() { echo "$(basename "$0"): $*" >&2; usage >&2; exit 2; }

# Quotes one word exactly like Python's shlex.quote, so printed commands can be pasted into a shell.
quote() {
  local LC_ALL=C
  if [[ -z $1 ]]; then printf "''"
  elif [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}
join() { local out='' w; for w; do out+="${out:+ }$(quote "$w")"; done; printf '%s' "$out"; }
