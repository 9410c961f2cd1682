"""The command line: `python -m tasks run|status|collect|failures|report`. Exit 0 all done,
1 some keys failed (or outputs could not be collected), 2 a usage or spec error,
3 the run root could not be used (a dead mount, a full disk: try again), 130 interrupted."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.bounds import (MAX_ATTEMPTS_LIMIT, MAX_CHUNK_SIZE, MAX_LEASE_S, MAX_LIMIT,
                          MAX_READ_WORKERS, MAX_TIMEOUT_S, MIN_LEASE_S, MIN_TIMEOUT_S,
                          WORKERS_PER_CPU_MAX, count_problem, seconds_problem)
from tasks.dryrun import dry_run
from tasks.errors import RootError, SpecError, TaskError
from tasks.failedkeys import failed_note
from tasks.failures import EXAMPLE_KEYS, FailureReport, failures, retry
from tasks.gpus import MAX_GPUS
from tasks.keylog import key_log
from tasks.keys import shown
from tasks.progress import make_progress
from tasks.runner import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS, START_METHODS, run
from tasks.spec import CmdTask, Task, import_module, load_spec
from tasks.status import status
from tasks.layout import is_object_url

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
MAX_WORKERS_ARG = 10**6  # `run --workers` parses up to this; the engine caps it per core


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _count(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number from {lo} to {hi}, "
                                             f"got {text!r}") from None
        why = count_problem(value, lo, hi)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return value

    return parse


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds from lo to hi (not nan, not inf)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = text  # type: ignore[assignment]  # seconds_problem says what it must be
        why = seconds_problem(value, lo, hi)
        if why is not None:
            raise argparse.ArgumentTypeError(why)
        return value

    return parse


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", metavar="SPEC",
                   help="module:function of a @filetask function (or use --cmd)")
    p.add_argument("--root", default=".", help="run root; paths are relative to it (default: .)")
    p.add_argument("--cmd", help="command line per key, e.g. 'convert {src} -resize 64x64 {out}'")
    p.add_argument("--src", help="glob of input files for --cmd, relative to the root")
    p.add_argument("--keys", dest="keys_file", metavar="FILE",
                   help="for --cmd: a text file with one key per line (instead of --src)")
    p.add_argument("--out", help="output template for --cmd, e.g. 'thumbs/{stem}.png'")
    p.add_argument("--key", default="path", choices=["path", "stem", "hash"],
                   help="for --cmd --src: key of a source (default: path; hash = content hash)")
    p.add_argument("--name", help="for --cmd: the task's name (default: derived from the command)")
    p.add_argument("--lease", type=_seconds(MIN_LEASE_S, MAX_LEASE_S), metavar="SECONDS",
                   help=f"a claim not refreshed this long is taken over (default {DEFAULT_LEASE_S:.0f}); "
                        "the first runner fixes it in the task's plan, later runners adopt that")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tasks", description="Idempotent, file-keyed tasks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens in detail")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run every key whose output does not exist yet")
    _spec_args(r)
    r.add_argument("--workers", type=_count(1, MAX_WORKERS_ARG),
                   help=f"worker processes (default: one per core; more than {WORKERS_PER_CPU_MAX} "
                        "per core are capped)")
    r.add_argument("--executor", choices=["process", "thread"], default="process")
    r.add_argument("--gpus", type=_count(1, MAX_GPUS), metavar="N",
                   help="share out N GPUs: one worker process per group of --gpus-per-worker, each "
                        "with its own CUDA_VISIBLE_DEVICES for its whole life (default: leave it alone)")
    r.add_argument("--gpus-per-worker", type=_count(1, MAX_GPUS), default=1, metavar="K",
                   help="GPUs in each worker process's group (default 1)")
    r.add_argument("--max-attempts", type=_count(1, MAX_ATTEMPTS_LIMIT), default=DEFAULT_MAX_ATTEMPTS,
                   metavar="K",
                   help=f"tries per key before it is reported failed (default {DEFAULT_MAX_ATTEMPTS})")
    r.add_argument("--limit", type=_count(1, MAX_LIMIT), metavar="N",
                   help="run at most N keys, then stop")
    r.add_argument("--retry-failed", action="store_true",
                   help="also run keys that reached --max-attempts in earlier runs")
    r.add_argument("--fsync", action="store_true",
                   help="flush each output to disk before publishing it (durable against power loss)")
    r.add_argument("--chunk-size", type=_count(1, MAX_CHUNK_SIZE), metavar="N",
                   help="keys per chunk (default: adaptive, from measured task time)")
    r.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                   help="how worker processes start (default forkserver)")
    r.add_argument("--timeout", type=_seconds(MIN_TIMEOUT_S, MAX_TIMEOUT_S), metavar="SECONDS",
                   help="stop a key running longer (its worker is killed) and count a failed "
                        "attempt (default: the task's timeout=, else none)")
    r.add_argument("--dry-run", action="store_true",
                   help="say what would run (counts, the first keys and, for --cmd, their command "
                        "lines, the chunking); takes no claim and writes nothing")
    r.add_argument("--json", action="store_true", help="with --dry-run: print one JSON object")
    r.add_argument("--keep-output", action="store_true",
                   help="for --cmd: keep each key's stdout and stderr (their last 1 MiB) under "
                        ".spotfan/tasks/<task>/output/; `tasks logs SPEC KEY` prints them")
    r.add_argument("--fetch", action="store_true",
                   help="the task reads only its own input: on a cluster, fetch small inputs in "
                        "batches over the runner's session and give the task a local copy")
    r.add_argument("--state-file", type=Path, metavar="PATH",
                   help="keep a JSON state of this runner in PATH (on a local disk), rewritten "
                        "at least every 2 s and at exit")
    s = sub.add_parser("status", help="count done, failed, running and pending keys")
    _spec_args(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    c = sub.add_parser("collect", help="read every output into one table (Parquet or pickle)")
    _spec_args(c)
    c.add_argument("--to", required=True, metavar="FILE",
                   help="table to write, e.g. results.parquet (relative to the current folder)")
    c.add_argument("--format", choices=["parquet", "pickle"],
                   help="default: from the suffix of --to (.parquet/.pq or .pkl/.pickle)")
    c.add_argument("--workers", type=_count(1, MAX_READ_WORKERS), metavar="N",
                   help="concurrent reads (default: many on a network mount, few on a local disk)")
    c.add_argument("--reader", metavar="MODULE:FUNCTION",
                   help="a function(path) -> DataFrame or dict, for outputs with no built-in reader")
    c.add_argument("--skip-unreadable", action="store_true",
                   help="leave out outputs that cannot be read (listed on stderr) instead of failing")
    c.add_argument("--key-column", default="key", metavar="NAME",
                   help="name of the column holding each row's key (default 'key')")
    f = sub.add_parser("failures", help="failed keys grouped by error; --retry sends them back")
    _spec_args(f)
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.add_argument("--retry", action="store_true",
                   help="reset the failed keys' records so the next run retries them")
    p = sub.add_parser("report", help="draw tasks completed and CPU use over time per host "
                                      "(PNG + HTML in .spotfan/tasks/<task>/)")
    _spec_args(p)
    p.add_argument("--to", metavar="DIR",
                   help="write <task>.report.png and .html into this local folder (default: the "
                        "task's .spotfan/tasks/<task>/ on a folder root, the current folder on a "
                        "bucket root)")
    lg = sub.add_parser("logs", help="print what a --cmd key printed (kept by --keep-output), or "
                                     "the error of its last failed attempt")
    _spec_args(lg)
    lg.add_argument("logs_key", metavar="KEY", help="the key whose output to print")
    return parser


def _task(args: argparse.Namespace) -> Task:
    return load_spec(args.spec, cmd=args.cmd, src=args.src, keys_file=args.keys_file,
                     out=args.out, name=args.name, key=args.key)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        task = _task(args)
        if args.command == "status":
            st = status(task, root=args.root, lease_s=args.lease)
            if args.json:
                print(st.to_json())
            else:
                print(f"{st.task}: {st.done}/{st.total} done, {st.failed} failed, "
                      f"{st.running} running, {st.pending} pending"
                      + (f" ({st.retrying} to retry)" if st.retrying else ""))
                for o in st.owners:
                    print(f"  worker {o.owner} on {o.host}: heartbeat {o.age:.0f}s ago")
            return EXIT_OK
        if args.command == "collect":
            return _collect(task, args)
        if args.command == "failures":
            return _failures(task, args)
        if args.command == "logs":
            return _logs(task, args)
        if args.command == "run" and args.keep_output:
            if not isinstance(task, CmdTask):
                raise SpecError("--keep-output is for --cmd tasks; a function task writes what "
                                "it wants to keep itself (its errors are in `tasks failures`)")
            if is_object_url(args.root):
                raise SpecError("--keep-output is not supported on an object-store root (s3://, gs://) "
                                "yet: each key's stdout and stderr would stay on the worker's local disk. "
                                "Run without it: a failed key's stderr end is still in its failure record "
                                "(`tasks failures`, `tasks logs SPEC KEY`)")
            task = dataclasses.replace(task, keep_output=True)
        if args.command == "run" and args.fetch:
            task = _fetching(task)
        if args.command == "report":
            from tasks.report import write_report  # numpy, matplotlib: only when asked

            rep = write_report(task.name, root=args.root, to=args.to)
            print(json.dumps({"task": rep.task, "png": str(rep.png), "html": str(rep.html),
                              "tasks": rep.tasks, "failures": rep.failures,
                              "hosts": len(rep.hosts)}))
            return EXIT_OK
        if args.dry_run:
            return _dry_run(task, args)
        if args.json:
            raise SpecError("--json goes with --dry-run: a real run always ends with one JSON line")
        progress = make_progress()
        try:
            report = run(task, root=args.root, workers=args.workers, executor=args.executor,
                         max_attempts=args.max_attempts, lease_s=args.lease, limit=args.limit,
                         retry_failed=args.retry_failed, fsync=args.fsync,
                         chunk_size=args.chunk_size, start_method=args.start_method,
                         timeout_s=args.timeout, state_file=args.state_file,
                         progress=progress, gpus=args.gpus, gpus_per_worker=args.gpus_per_worker)
        finally:
            progress.close()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (RootError, OSError) as e:
        # The root itself could not be used (a dead mount, a full disk, no permission):
        # nothing is wrong with the keys, so this is not "failed" (1); try again later.
        heal = "" if is_object_url(args.root) else " (on a cluster, `fab heal` remounts dead mounts)"
        said = str(e)  # an environment fault already says how to recover
        advice = "" if "run the same command again" in said else (
            f". Nothing is lost: fix it{heal} and run the same command again")
        print(f"error: the run root could not be used: {said}{advice}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: claims released; run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    print(json.dumps({"task": report.task, "total": report.total, "done_before": report.done_before,
                      "ran": report.ran, "succeeded": report.succeeded, "by_peers": report.by_peers,
                      "failed": len(report.failed), "left": report.left,
                      "seconds": round(report.seconds, 3)}))
    if report.failed:
        print(failed_note(report, args.root), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _dry_run(task: Task, args: argparse.Namespace) -> int:
    got = dry_run(task, root=args.root, workers=args.workers, limit=args.limit,
                  retry_failed=args.retry_failed, chunk_size=args.chunk_size, lease_s=args.lease)
    if args.json:
        print(got.to_json())
        return EXIT_OK
    print(f"dry run of {got.task} in {got.root}: {got.total} keys, {got.done} done, "
          f"{got.failed} failed, {got.left} left"
          + (f" ({got.retrying} to retry)" if got.retrying else "")
          + (f"; --limit runs {got.would_run}" if got.would_run < got.left else ""))
    if got.keys:
        more = f" (of {got.would_run})" if got.would_run > len(got.keys) else ""
        print(f"first keys that would run{more}:")
        if got.commands and is_object_url(args.root):
            print(f"  (paths relative to {got.root}: each command gets a local copy of its input "
                  "and writes a local temporary, uploaded when it exits)")
        for i, key in enumerate(got.keys):
            line = got.commands[i] if got.commands else ""
            print(f"  {shown(key)}" + (f"\n    $ {line if line.isprintable() else repr(line)}"
                                       if got.commands else ""))
    print(f"chunking: {got.chunking.describe()}")
    print("nothing was claimed or written; run without --dry-run to start")
    return EXIT_OK


def _load_reader(spec: str) -> Callable[[Path], Any]:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SpecError(f"--reader {spec!r} must be module:function, e.g. examples.commands:read_sha256")
    obj: Any = import_module(module, what="the reader's module")
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise SpecError(f"--reader {spec!r} names no function in {module!r}")
    return obj  # type: ignore[no-any-return]


def _fetching(task: Task) -> Task:
    """`task`, told that it reads only its own input (tasks run --fetch)."""
    if task.source.src is None:
        raise SpecError("--fetch is for tasks with input files (src= or --src): a keys= task "
                        "has no input to fetch")
    if isinstance(task, CmdTask):
        return dataclasses.replace(task, fetch=True)
    task.fetch = True  # read by the runner only: its workers are given the copies
    return task


def _collect(task: Task, args: argparse.Namespace) -> int:
    # pandas is imported here, not at the top: `run` and `status` start without it.
    from tasks.collect import collect, table_format, write_table

    if is_object_url(args.to):
        raise SpecError(f"--to {args.to!r}: the table is written to a local file; copy it to a "
                        "bucket afterwards (aws s3 cp, gcloud storage cp) if you need it there")
    fmt = table_format(args.to, args.format)  # refuse a bad --to before reading anything
    reader = _load_reader(args.reader) if args.reader else None
    progress = make_progress()
    try:
        got = collect(task, root=args.root, workers=args.workers, reader=reader,
                      skip_unreadable=args.skip_unreadable, key_column=args.key_column,
                      progress=progress)
    finally:
        progress.close()
    path = write_table(got.frame, args.to, format=fmt)
    print(json.dumps({"task": got.task, "to": str(path), "format": fmt, "rows": len(got.frame),
                      "columns": len(got.frame.columns), "outputs": got.read,
                      "missing": got.missing, "unreadable": len(got.unreadable),
                      "seconds": round(got.seconds, 3)}))
    if got.missing:
        print(f"{got.missing} of {got.total} keys are not done (no output yet) and are absent "
              "from the table", file=sys.stderr)
    if got.unreadable:
        print(f"skipped {len(got.unreadable)} unreadable output(s):", file=sys.stderr)
        for u in got.unreadable:
            print(f"  {u.key!r} ({u.path}): {u.reason}", file=sys.stderr)
    return EXIT_OK


def _failures(task: Task, args: argparse.Namespace) -> int:
    rep = failures(task, root=args.root)
    reset = retry(task, root=args.root) if args.retry else []
    if args.json:
        data = json.loads(rep.to_json())
        if args.retry:
            data["retried"] = reset
        print(json.dumps(data))
        return EXIT_OK
    _print_failures(rep)
    if args.retry:
        print(f"\nreset {len(reset)} key(s): the next `python -m tasks run` of this task retries "
              "them (a run already in progress does not pick them up)")
    return EXIT_OK


def _print_failures(rep: FailureReport) -> None:
    if not rep.failed:
        print(f"{rep.task}: no failed keys ({rep.total} keys)")
        return
    retrying = rep.failed - rep.gave_up
    print(f"{rep.task}: {rep.failed} of {rep.total} keys failed ({rep.gave_up} gave up"
          + (f", {retrying} will be retried" if retrying else "") + f"), "
          f"{len(rep.groups)} distinct error(s)")
    for i, g in enumerate(rep.groups, 1):
        shown = ", ".join(repr(k) for k in g.keys[:EXAMPLE_KEYS])
        more = f" and {g.count - EXAMPLE_KEYS} more" if g.count > EXAMPLE_KEYS else ""
        print(f"\n[{i}] {g.count} key(s): {g.signature}")
        print(f"    keys: {shown}{more}")
        if g.error != g.signature:
            print(f"    e.g.: {g.error}")
        for line in g.detail.splitlines():
            print(f"    | {line}")


def _logs(task: Task, args: argparse.Namespace) -> int:
    """How a key's last attempt ended (failed: which attempt, why, when), then its kept output."""
    log = key_log(task, root=args.root, key=args.logs_key)
    name = repr(args.logs_key)
    f = log.failure
    if log.done:
        print(f"==> {name} succeeded: its output {shown(log.out)} exists")
    elif f is not None:
        of = f" of {f.max_attempts}" if f.max_attempts else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(f.time))
        then = ("given up: `tasks failures --retry` sends it back" if f.gave_up
                else "it is tried again by this run or the next")
        print(f"==> {name}: attempt {f.attempts}{of} failed at {when} on {f.host}: {f.error}; {then}")
    elif log.is_key:
        print(f"==> {name} has not run yet: no output at {shown(log.out)}, no failed attempt recorded")
    else:
        print(f"error: {name} is not a key of {task.name} ({log.keys} keys): "
              "`tasks run SPEC --dry-run` shows the first few", file=sys.stderr)
        return EXIT_FAILED
    if log.stdout is None and log.stderr is None:
        if f is not None and f.detail.strip():
            print(f"==> stderr of {name}, its end (last attempt)")
            print(f.detail.rstrip())
        if isinstance(task, CmdTask) and (log.done or f is not None):
            print("(no output kept: --keep-output is not supported on an object-store root yet)"
                  if is_object_url(args.root) else
                  "(no output kept: run the task with --keep-output to keep each key's stdout and stderr)")
        return EXIT_OK
    for label, path in (("stdout", log.stdout), ("stderr", log.stderr)):
        data = path.read_bytes() if path is not None else b""
        print(f"==> {label} of {name} ({len(data)} bytes, last attempt)")
        sys.stdout.write(data.decode("utf-8", "replace"))
        if data and not data.endswith(b"\n"):
            print()
    return EXIT_OK
