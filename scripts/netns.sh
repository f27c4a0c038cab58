#!/usr/bin/env bash
# Run a command inside a private network + pid namespace: only loopback exists, so every Ray port is
# loopback-only, and every process started inside dies with the namespace.
# Falls back to running directly (with a warning) where unshare is not permitted (non-root).
set -euo pipefail
if [ "${RAYFT_IN_NETNS:-}" = 1 ]; then exec "$@"; fi
if unshare --net --pid --fork --mount-proc true 2>/dev/null; then
  # bash stays the namespace's pid 1 (the command runs as its child) so that orphaned processes are reaped:
  # a zombie adopted by a pid 1 that never reaps (pytest) counts as running for Ray's job supervisor,
  # which then waits out RAY_JOB_STOP_WAIT_TIME_S before it reports a stopped job
  exec unshare --net --pid --fork --mount-proc env RAYFT_IN_NETNS=1 bash -c 'ip link set lo up && { "$@"; rc=$?; exit $rc; }' _ "$@"
fi
echo "netns.sh: cannot create a private network namespace (need root); running without isolation" >&2
exec "$@"
