#!/usr/bin/env bash
# Set up from nothing and run the example job. Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ROOT="${DEMO_ROOT:-$PWD/.demo}"
mkdir -p "$ROOT"
echo "==> preparing inputs under $ROOT"
python - "$ROOT" <<'PY'
import sys, pathlib, random
root = pathlib.Path(sys.argv[1]) / "data"
root.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
for i in range(2000):
    p = root / f"doc{i:04d}.txt"
    if not p.exists():
        p.write_text(" ".join(rng.choice(["spot", "fan", "key", "out"]) for _ in range(200)))
PY
echo "==> running: python -m tasks run --cmd 'wc -w < {src} > {out}' --src 'data/*.txt' --out 'counts/{stem}.txt'"
python -m tasks run --root "$ROOT" --name wordcount --cmd 'wc -w < {src} > {out}' \
    --src 'data/*.txt' --out 'counts/{stem}.txt'
python -m tasks status --root "$ROOT" --name wordcount --cmd 'wc -w < {src} > {out}' \
    --src 'data/*.txt' --out 'counts/{stem}.txt'
