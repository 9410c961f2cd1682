#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine, then run it.
# Safe to run twice: installs only what is missing. Usage: ./scripts/test.sh [pytest args]
# The suite runs in SPOTFAN_TEST_JOBS pytest-xdist workers (default 4; 0: one process): most
# of its time is lab VMs waiting out idle timeouts and leases, not CPU, so even 2 cores
# finish it in well under half the time. Each worker has its own lab (tests/cluster/fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
JOBS="${SPOTFAN_TEST_JOBS:-4}"
echo "==> running the test suite ($JOBS workers)"
set +e
if [ "$JOBS" -gt 0 ]; then
    "$VENV/bin/python" -m pytest -q -ra -n "$JOBS" "$@"
else
    "$VENV/bin/python" -m pytest -q -ra "$@"
fi
rc=$?
set -e
exit $rc
