#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian/Ubuntu machine, then run it.
# Safe to run twice: installs only what is missing. Usage: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
echo "==> running the test suite"
set +e
"$VENV/bin/python" -m pytest -q -ra "$@"
rc=$?
set -e
exit $rc
