"""What this VM is busy with, on the command line: one sample and its verdict, or a metric sample
every few seconds appended to a file.

    python -m cluster.vm.top --seconds 3 --json               # what `fab top` runs on every VM
    python -m cluster.vm.top record --to FILE --interval 5    # what the worker agent runs

`record` appends one tasks.records.MetricSample per line to FILE, normally
ROOT/.spotfan/metrics/<host>.jsonl, which tasks/report.py draws.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from cluster.vm.gpus import GpuMeter
from cluster.vm.sample import DEFAULT_SECONDS, MAX_SECONDS, sample
from cluster.vm.verdict import describe, verdict

RECORD_TICK_S = 1.0  # how often process states are looked at while recording (cheaper, runs for hours)


def record(path: str | Path, interval_s: float, stop_event: threading.Event, *,
           pids: Iterable[int] | None = None, max_samples: int | None = None,
           gpu: GpuMeter | None = None) -> int:
    """Append one metric sample per `interval_s` to `path` until `stop_event` is set (or
    `max_samples` were written). Returns how many were written. `gpu` looks at the GPUs,
    kept open across samples (default: NVML or `nvidia-smi` on PATH)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meter = gpu if gpu is not None else GpuMeter()
    written = 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            while not stop_event.is_set() and (max_samples is None or written < max_samples):
                s = sample(interval_s, pids=pids, tick_s=min(RECORD_TICK_S, interval_s),
                           stop=stop_event, gpu=meter)
                f.write(s.metric_sample().to_json() + "\n")
                f.flush()
                written += 1
    finally:
        meter.close()
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.vm.top",
                                     description="What this machine is busy with, and a verdict.")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"how long to sample (default {DEFAULT_SECONDS:.0f})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--workers", type=int, help="pool processes the run was asked for")
    parser.add_argument("--pid", type=int, action="append", dest="pids",
                        help="a worker's main process (default: every `python -m tasks run`)")
    parser.add_argument("--nvidia-smi", default="nvidia-smi",
                        help="the driver's tool, when nvidia-ml-py is not installed (default: on PATH)")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="append a metric sample every --interval seconds")
    rec.add_argument("--to", required=True, help="file to append to, e.g. "
                     "ROOT/.spotfan/metrics/$(hostname).jsonl")
    rec.add_argument("--interval", type=float, default=5.0, help="seconds per sample (default 5)")
    rec.add_argument("--for", dest="duration", type=float,
                     help="stop after this many seconds (default: until SIGTERM or Ctrl-C)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:.0f}]")
    if args.command == "record":
        if not 0 < args.interval <= MAX_SECONDS:
            parser.error(f"--interval must be in (0, {MAX_SECONDS:.0f}]")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        limit = None if args.duration is None else max(1, round(args.duration / args.interval))
        try:
            n = record(args.to, args.interval, stop, pids=args.pids, max_samples=limit,
                       gpu=GpuMeter(nvidia_smi=args.nvidia_smi))
        except KeyboardInterrupt:
            return 130
        print(f"wrote {n} sample(s) to {args.to}", file=sys.stderr)
        return 0
    meter = GpuMeter(nvidia_smi=args.nvidia_smi)
    try:
        s = sample(args.seconds, pids=args.pids, gpu=meter)
    finally:
        meter.close()
    v = verdict(s, workers=args.workers)
    if args.json:
        print(json.dumps({"sample": s.to_dict(), "verdict": v.to_dict()}))
    else:
        print(describe(s, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
