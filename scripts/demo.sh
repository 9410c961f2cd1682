#!/usr/bin/env bash
# The main job on the embedded default, a local lab cluster: set up from nothing, bring up
# 3 lab VMs and a jailed head, compute numpy features for 6,000 generated images over the
# shared SSHFS directory, preempt a VM in the middle, heal it, show status and results,
# and tear everything down. Needs root (namespaces, sshd, FUSE). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export SPOTFAN_CONFIG="$PWD/cluster.toml"
N_IMAGES="${DEMO_IMAGES:-6000}"
SPEC=examples.images:features
SHARE="$(python -c 'from cluster.config import load, config_path; print(load(config_path(None)).head.share)')"
fab() { "$VENV/bin/fab" "$@"; }

cleanup() { echo; echo "==> tearing the cluster down"; fab down || true; }
trap cleanup EXIT

if [[ -e "$SHARE/features" || -e "$SHARE/.spotfan" ]]; then
    # The demo's own scratch results: without this a second demo would find every key
    # done and skip the lot (which is the point of spotfan, but not of a demo).
    echo "==> removing an earlier demo's outputs and bookkeeping from $SHARE"
    rm -rf "$SHARE/features" "$SHARE/.spotfan"
fi

echo "==> bringing up the lab cluster ($SPOTFAN_CONFIG)"
fab up

echo "==> generating $N_IMAGES images on the head's share ($SHARE/images)"
python -m examples.images prepare --root "$SHARE" --n "$N_IMAGES"

echo "==> fab run $SPEC (shipping examples/ to the share; 2 worker processes per VM)"
fab run "$SPEC" --ship examples --workers-per-vm 2 --lease 30

# Wait (bounded) until about a third is done, then preempt one VM the way a cloud would.
python - <<'PY'
import json, subprocess, sys, time
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    st = json.loads(subprocess.run(["fab", "status", "--json"], capture_output=True, text=True,
                                   check=True).stdout)
    run = st["runs"][-1]
    if run["total"] and run["done"] and run["done"] >= run["total"] // 3:
        print(f"==> {run['done']}/{run['total']} done: time for a preemption", flush=True)
        sys.exit(0)
    time.sleep(1)
sys.exit("the run did not get a third of the way in 300 s; see `fab logs VM`")
PY
fab preempt --count 1
fab status
echo "==> fab heal: start the preempted VM again; its boot script remounts and resumes"
fab heal

echo "==> following the run to the end: fab status --watch"
fab status --watch --interval 5 --timeout 600
result=$(fab status --json | python -c 'import json, sys; print(json.load(sys.stdin)["runs"][-1]["result"])')
if [[ "$result" != done ]]; then
    echo "error: the run ended '$result'; \`fab failures\` shows why, \`fab logs VM\` what each VM printed" >&2
    exit 1
fi
fab status

echo "==> results: every feature vector in one table, fetched to the laptop"
mkdir -p .demo
fab collect --to "$PWD/.demo/features.parquet"
python - "$PWD/.demo/features.parquet" <<'PY'
import sys
import pandas as pd
df = pd.read_parquet(sys.argv[1])
print(f"{len(df)} images x {df.shape[1] - 1} features; first rows:")
print(df.iloc[:5, :6].to_string(index=False))
PY
echo "==> the run as a picture: tasks over time per VM, CPU per VM"
fab report --to "$PWD/.demo/reports"
