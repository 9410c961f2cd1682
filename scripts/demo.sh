#!/usr/bin/env bash
# The main job on the embedded default, a local lab cluster: set up from nothing, bring up
# 3 lab VMs and a jailed head, compute numpy features for 6,000 generated images over the
# shared SSHFS directory, preempt a VM in the middle, heal it, show status and results,
# and tear everything down (also on failure or Ctrl-C: exit 130). Needs root (namespaces,
# sshd, FUSE). Safe to run twice. The steps are scripts/demo.py; SPOTFAN_CONFIG picks
# another cluster.toml, DEMO_IMAGES another number of images.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> demo: checking system packages and the virtualenv (scripts/setup.sh)"
source scripts/setup.sh
exec "$VENV/bin/python" scripts/demo.py
