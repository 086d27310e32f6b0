#!/usr/bin/env bash
# Sourced by the launch scripts.
# The arguments as one shell command line, quoting only those that need it.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  printf '%s' "${out[*]}"
}
