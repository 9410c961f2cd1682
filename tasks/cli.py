"""The command line: `python -m tasks run|status`. Exit 0 all done, 1 some keys failed,
2 a usage or spec error, 130 interrupted."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from tasks.errors import SpecError, TaskError
from tasks.progress import make_progress
from tasks.runner import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS, START_METHODS, run
from tasks.spec import Task, load_spec
from tasks.status import status

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


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
    p.add_argument("--lease", type=float, default=DEFAULT_LEASE_S, metavar="SECONDS",
                   help=f"a claim not refreshed this long is taken over (default {DEFAULT_LEASE_S:.0f})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m tasks", description="Idempotent, file-keyed tasks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens in detail")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run every key whose output does not exist yet")
    _spec_args(r)
    r.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    r.add_argument("--executor", choices=["process", "thread"], default="process")
    r.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS, metavar="K",
                   help=f"tries per key before it is reported failed (default {DEFAULT_MAX_ATTEMPTS})")
    r.add_argument("--limit", type=int, metavar="N", help="run at most N keys, then stop")
    r.add_argument("--retry-failed", action="store_true",
                   help="also run keys that reached --max-attempts in earlier runs")
    r.add_argument("--fsync", action="store_true",
                   help="flush each output to disk before publishing it (durable against power loss)")
    r.add_argument("--chunk-size", type=int, metavar="N",
                   help="keys per chunk (default: adaptive, from measured task time)")
    r.add_argument("--start-method", choices=START_METHODS, default="forkserver",
                   help="how worker processes start (default forkserver)")
    s = sub.add_parser("status", help="count done, failed, running and pending keys")
    _spec_args(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")
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
        progress = make_progress()
        try:
            report = run(task, root=args.root, workers=args.workers, executor=args.executor,
                         max_attempts=args.max_attempts, lease_s=args.lease, limit=args.limit,
                         retry_failed=args.retry_failed, fsync=args.fsync,
                         chunk_size=args.chunk_size, start_method=args.start_method,
                         progress=progress)
        finally:
            progress.close()
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
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
        shown = ", ".join(repr(k) for k in report.failed[:5])
        print(f"{len(report.failed)} key(s) failed after {args.max_attempts} attempt(s): {shown}"
              f"{' ...' if len(report.failed) > 5 else ''}. Errors are in "
              f"{args.root}/.spotfan/tasks/{report.task}/failed/; rerun with --retry-failed "
              "after fixing the cause", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
