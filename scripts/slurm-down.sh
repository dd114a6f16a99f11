#!/usr/bin/env bash
# Stop the CI Slurm cluster started by slurm-up.sh and wipe its state.
# Never fails when nothing is running. --keep-munge leaves munged alone
# (used by slurm-up.sh when it only needs to restart Slurm).
set -euo pipefail
STATE=${SLURM_CI_DIR:-/tmp/slurm-ci}

# TERM, wait up to 10 s, then KILL. pidof matches the exact program name, so
# this also catches daemons whose pid file is gone, and never other programs.
stop() {
  local name=$1 pids
  read -ra pids <<<"$(pidof "$name" || true)"
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "${pids[@]}" 2>/dev/null || { echo "stopped $name"; return 0; }
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
  echo "killed $name"
}
stop slurmd
# Job step daemons of still-running jobs would otherwise outlive slurmd.
stop slurmstepd
stop slurmctld
[[ ${1:-} == --keep-munge ]] || stop munged
rm -rf "$STATE"
echo "Slurm down"
