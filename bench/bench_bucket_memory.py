"""Peak memory of a bucket upload and download against the file's size: big files are streamed.

Starts the test servers of tests/objstore on 127.0.0.1 (moto behind the S3 fault proxy, and
the GCS emulator; both keep objects in this process's memory), writes one file of SIZE_MB,
and for each store runs a child process that `upload`s the file only if absent and
`download`s it back to a new path, and reports how much its peak RSS (VmHWM, reset before
each step) rose above its RSS before the step. Linux only. Goal: each growth well under the file's size (S3 sends the
file from disk, or in PART_SIZE parts above the multipart threshold; GCS in UPLOAD_CHUNK
chunks above 8 MiB; both download in COPY_CHUNK pieces).
Usage: python bench/bench_bucket_memory.py [--size-mb 128] [--multipart-mb 64]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD_TIMEOUT_S = 1800  # one upload and download of the whole file

CHILD = """
import json, sys
from pathlib import Path
from tasks.store import open_bucket

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no " + field + " in /proc/self/status")

def growth(step):
    # VmHWM is the peak RSS of this process image; writing 5 to clear_refs resets it to
    # the current RSS (Linux 4.0+), so the peak above the RSS before the step is its cost.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_mb("VmRSS")
    step()
    return status_mb("VmHWM") - before

url, name, source, target, threshold = sys.argv[1:6]
bucket = open_bucket(url)
if bucket.scheme == "s3":
    bucket.multipart_threshold = int(threshold)
bucket.check()
base = status_mb("VmRSS")
up = growth(lambda: bucket.upload(Path(source), name))
down = growth(lambda: bucket.download(name, Path(target)))
print(json.dumps({"base_mb": base, "upload_growth_mb": up, "download_growth_mb": down}))
"""


def run_child(url: str, env: dict[str, str], source: Path, target: Path, threshold: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, url, "bench/big.bin", str(source), str(target), str(threshold)],
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        raise SystemExit(f"the child failed:\n{done.stderr}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=128)
    parser.add_argument("--multipart-mb", type=int, default=64, help="S3's multipart threshold")
    args = parser.parse_args()

    from tests.objstore.gcs_emulator import GcsEmulator
    from tests.objstore.moto_s3 import moto_s3

    with tempfile.TemporaryDirectory(prefix="bench-bucket-") as tmp:
        source = Path(tmp) / "big.bin"
        with open(source, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1 << 20))
        with moto_s3() as s3, GcsEmulator() as gcs:
            s3.make_bucket("bench")
            gcs.create_bucket("bench")
            rows = [("s3", run_child("s3://bench/", dict(s3.env), source, Path(tmp) / "s3.bin", args.multipart_mb << 20)),
                    ("gs", run_child("gs://bench/", gcs.env, source, Path(tmp) / "gs.bin", 0))]
            for scheme in ("s3", "gs"):
                assert (Path(tmp) / f"{scheme}.bin").read_bytes() == source.read_bytes(), scheme
    print(f"file {args.size_mb} MB; S3 multipart above {args.multipart_mb} MB")
    print(f"{'store':6} {'base RSS MB':>12} {'upload +MB':>11} {'download +MB':>13}")
    for scheme, row in rows:
        print(f"{scheme:6} {row['base_mb']:12.1f} {row['upload_growth_mb']:11.1f} {row['download_growth_mb']:13.1f}")


if __name__ == "__main__":
    main()
