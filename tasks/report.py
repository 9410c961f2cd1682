"""A picture of a run: tasks completed over time per host, CPU use per host (and GPU use per host
when the samples have it), as a PNG and an HTML page in the task's bookkeeping folder
(`.spotfan/tasks/<task>/report.*`), or in a local folder as `<task>.report.*` (`to=`; on an
object-store root, where the logs and samples are objects, the current folder by default).

Reads only files under the root, so it works while the run goes on:
  - the execution logs, `.spotfan/tasks/<task>/log/*.jsonl`, one row per execution:
    {"key", "start", "seconds", "ok", "dup", "owner", "host"};
  - metric samples, if hosts record them, `.spotfan/metrics/<host>.jsonl`: one
    `records.MetricSample` per line, of which "t" (seconds since the epoch, end of the
    sample) and "cpu" (busy percent of the whole machine, 0-100) are needed, "iowait"
    (percent) and "gpus" (records.GpuMetric per GPU) are used when present.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import ReportError, SpecError
from tasks.fs import atomic_write
from tasks.layout import METRICS_DIR, Layout
from tasks.records import gpu_metrics, read_jsonl, read_logs
from tasks.layout import is_object_url

logger = logging.getLogger(__name__)

METRICS_MARGIN_S = 60.0  # metric samples this close to the run are read (the plot shows the run)
MAX_POINTS = 2000  # points per drawn line; longer series are thinned evenly
METRICS_GAP_FACTOR = 3.0  # samples further apart than this many typical intervals: a gap
MAX_LEGEND_HOSTS = 16  # above this many hosts the legend is left out (the table names them)
FIG_SIZE = (11.0, 8.5)  # inches
DPI = 110
GPU_PANEL_IN = 2.2  # inches added to the figure for the GPU panel


@dataclass(frozen=True)
class HostSummary:
    """What one host did in the run."""

    host: str  # machine name, as the workers logged it
    tasks: int  # executions that published an output (or found a peer's directory output)
    failures: int  # executions that failed (a key retried counts each time)
    first: float  # seconds since the epoch when its first task started
    last: float  # seconds since the epoch when its last task ended
    busy_s: float  # the sum of its tasks' run times
    cpu_mean: float | None  # mean CPU busy percent from metric samples, if recorded
    iowait_mean: float | None  # mean iowait percent from metric samples, if recorded
    gpu_mean: float | None = None  # mean GPU busy percent (over its GPUs and samples), if recorded

    @property
    def rate(self) -> float:
        """Tasks per minute over the time this host worked."""
        span = self.last - self.first
        return 60.0 * self.tasks / span if span > 0 else 0.0


@dataclass(frozen=True)
class Report:
    """The files written and what they show."""

    task: str  # the task's name
    png: Path  # the picture
    html: Path  # a page with the picture and a table per host
    start: float  # seconds since the epoch: the first task's start
    end: float  # seconds since the epoch: the last task's end
    tasks: int  # executions that succeeded, all hosts
    failures: int  # executions that failed, all hosts
    hosts: tuple[HostSummary, ...]  # by host name


def write_report(task: str, *, root: str | Path = ".", to: str | Path | None = None) -> Report:
    """Draw the report of the task named `task` under `root` and write it next to its logs
    (or into the folder `to`, as `<task>.report.png|html`). On an object-store root
    (`s3://B/P`, `gs://B/P`) the logs and metric samples are objects under the prefix and
    the files are written locally: into `to`, by default the current folder. Raises
    ReportError if nothing was logged yet."""
    folder = _report_folder(to)
    if is_object_url(str(root)):
        from tasks.store.records import read_logs as read_bucket_logs  # the SDKs: only for a bucket
        from tasks.store.views import jsonl_objects, opened

        with opened(str(root)) as bucket:
            layout = Layout(Path(), task)
            where = f"{bucket.where(layout.log)}/"
            rows = [r for r in read_bucket_logs(bucket, layout) if _is_row(r)]
            _refuse_empty(task, rows, where)
            samples = list(jsonl_objects(bucket, METRICS_DIR))
        shown = str(bucket)
        base = Path(folder or ".").resolve() / f"{task}.report"
    else:
        here = Path(root).resolve()
        layout = Layout(here, task)
        rows = [r for r in read_logs(layout.log) if _is_row(r)]
        _refuse_empty(task, rows, str(layout.log))
        samples = list(read_jsonl(here / METRICS_DIR))
        shown = str(here)
        base = folder.resolve() / f"{task}.report" if folder else layout.task_dir / "report"
    start = min(r["start"] for r in rows)
    end = max(r["start"] + r["seconds"] for r in rows)
    metrics = _metrics(samples, since=start - METRICS_MARGIN_S, until=end + METRICS_MARGIN_S)
    hosts = _summaries(rows, metrics)
    png_bytes = _draw(task, rows, metrics, start, end, hosts)
    png = base.with_name(base.name + ".png")
    page = base.with_name(base.name + ".html")
    atomic_write(png, png_bytes, make_parents=True)
    report = Report(task, png, page, start, end, sum(h.tasks for h in hosts),
                    sum(h.failures for h in hosts), tuple(hosts))
    atomic_write(page, _html(report, shown, png_bytes, bool(metrics)).encode("utf-8"), make_parents=True)
    logger.info("report of %s: %s, %s", task, png, page)
    return report


def _report_folder(to: str | Path | None) -> Path | None:
    """The local folder `to`, checked before anything is read."""
    if to is None:
        return None
    if is_object_url(str(to)):
        raise SpecError(f"--to {str(to)!r}: the report is written to a local folder; copy it to "
                        "a bucket afterwards (aws s3 cp, gcloud storage cp) if you need it there")
    folder = Path(to)
    if not folder.is_dir():
        raise SpecError(f"--to {str(to)!r} is not a folder; create it first, or leave --to out")
    return folder


def _refuse_empty(task: str, rows: list[dict[str, Any]], where: str) -> None:
    if not rows:
        raise ReportError(f"no executions of {task} are logged under {where}; run the task "
                          "first (python -m tasks run ...), or check --root and the task name")


def _is_row(r: Any) -> bool:
    return (isinstance(r, dict) and isinstance(r.get("start"), (int, float))
            and isinstance(r.get("seconds"), (int, float)))


def read_metrics(root: str | Path, *, since: float = 0.0,
                 until: float = float("inf")) -> dict[str, list[dict[str, Any]]]:
    """Metric samples per host between `since` and `until`, sorted by time; each one's "gpus"
    is a validated tuple of records.GpuMetric (() for a host without). Torn or foreign lines
    are skipped: a recorder may be killed mid-line."""
    return _metrics(read_jsonl(Path(root) / METRICS_DIR), since=since, until=until)


def _metrics(lines: Iterable[tuple[str, dict[str, Any]]], *, since: float,
             until: float) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for name, s in lines:
        if (isinstance(s.get("t"), (int, float)) and isinstance(s.get("cpu"), (int, float))
                and since <= s["t"] <= until):
            gpus = gpu_metrics(s.get("gpus"))
            if gpus is None:
                continue  # a "gpus" no sampler writes: the line is foreign
            host = str(s.get("host") or name[: -len(".jsonl")])
            found.setdefault(host, []).append({**s, "gpus": gpus})
    for samples in found.values():
        samples.sort(key=lambda s: s["t"])
    return found


def _summaries(rows: list[dict[str, Any]],
               metrics: dict[str, list[dict[str, Any]]]) -> list[HostSummary]:
    by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_host[str(r.get("host", "?"))].append(r)
    out = []
    for host in sorted(set(by_host) | set(metrics)):
        hr = by_host.get(host, [])
        samples = metrics.get(host, [])
        iowaits = [s["iowait"] for s in samples if isinstance(s.get("iowait"), (int, float))]
        gpu_use = [u for u in (_gpu_use(s) for s in samples) if u is not None]
        out.append(HostSummary(
            host,
            tasks=sum(1 for r in hr if r.get("ok")),
            failures=sum(1 for r in hr if not r.get("ok")),
            first=min((r["start"] for r in hr), default=0.0),
            last=max((r["start"] + r["seconds"] for r in hr), default=0.0),
            busy_s=sum(r["seconds"] for r in hr),
            cpu_mean=float(np.mean([s["cpu"] for s in samples])) if samples else None,
            iowait_mean=float(np.mean(iowaits)) if iowaits else None,
            gpu_mean=float(np.mean(gpu_use)) if gpu_use else None))
    return out


def _gpu_use(sample: dict[str, Any]) -> float | None:
    """Mean busy percent of a sample's GPUs that report it; None for a sample without."""
    utils = [g.util for g in sample.get("gpus", ()) if g.util is not None]
    return float(np.mean(utils)) if utils else None


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).astype(int))
    return x[idx], y[idx]


def _draw(task: str, rows: list[dict[str, Any]], metrics: dict[str, list[dict[str, Any]]],
          start: float, end: float, hosts: list[HostSummary]) -> bytes:
    from matplotlib.figure import Figure  # heavy import: only when drawing

    span_s = max(end - start, 1e-9)
    unit, scale = ("min", 60.0) if span_s >= 180 else ("s", 1.0)
    names = [h.host for h in hosts]
    colors = {h: _color(i) for i, h in enumerate(names)}
    with_gpus = any(h.gpu_mean is not None for h in hosts)
    fig = Figure(figsize=(FIG_SIZE[0], FIG_SIZE[1] + (GPU_PANEL_IN if with_gpus else 0.0)), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(4 if with_gpus else 3, 1, sharex=True,
                        gridspec_kw={"height_ratios": [1, 1.4, 1.2] + ([1.2] if with_gpus else [])})
    ax_all, ax_host, ax_cpu = axes[:3]
    ok_ends = np.sort(np.array([r["start"] + r["seconds"] for r in rows if r.get("ok")]))
    bad_ends = np.sort(np.array([r["start"] + r["seconds"] for r in rows if not r.get("ok")]))

    # All hosts: what is done, and how fast it goes.
    x, y = _thin((np.concatenate([[start], ok_ends]) - start) / scale,
                 np.arange(len(ok_ends) + 1))
    ax_all.step(x, y, where="post", color="black", lw=1.8, label=f"succeeded ({len(ok_ends)})")
    if len(bad_ends):
        x, y = _thin((bad_ends - start) / scale, np.arange(1, len(bad_ends) + 1))
        ax_all.step(x, y, where="post", color="tab:red", lw=1.4,
                    label=f"failed executions ({len(bad_ends)})")
    ax_all.set_ylabel("tasks, all hosts")
    ax_all.set_title("Tasks completed, all hosts", loc="left", fontsize=11)
    ax_all.legend(loc="upper left", fontsize=9, frameon=False)

    # Per host: a flat stretch is a host that stopped (preempted, stuck or out of work).
    for h in names:
        ends = np.sort(np.array([r["start"] + r["seconds"] for r in rows
                                 if r.get("ok") and str(r.get("host", "?")) == h]))
        if len(ends) == 0:
            continue
        x, y = _thin((ends - start) / scale, np.arange(1, len(ends) + 1))
        ax_host.step(np.concatenate([[x[0]], x]), np.concatenate([[0], y]), where="post",
                     color=colors[h], lw=1.4, label=f"{h} ({len(ends)})")
    ax_host.set_ylabel("tasks per host")
    ax_host.set_title("Tasks completed per host (flat = not finishing tasks)", loc="left",
                      fontsize=11)
    if len(names) <= MAX_LEGEND_HOSTS:  # one legend, outside: the CPU panel shares its colors
        for h in names:
            if not any(str(r.get("host", "?")) == h and r.get("ok") for r in rows):
                ax_host.plot([], [], color=colors[h], lw=1.4, label=f"{h} (0)")
        ax_host.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                       frameon=False, title="host (tasks)", title_fontsize=8)

    # CPU (and GPU) per host from recorded samples.
    ax_cpu.set_title("CPU use per host", loc="left", fontsize=11)
    ax_cpu.set_ylabel("CPU busy %")
    ax_cpu.set_ylim(0, 105)
    if metrics:
        for h, samples in sorted(metrics.items()):
            _series(ax_cpu, samples, lambda s: float(s["cpu"]), start, scale, colors.get(h, "gray"), h)
    else:
        ax_cpu.text(0.5, 0.5, "no metric samples recorded\n(workers record them with "
                    "a sampler such as cluster.vm.top record into .spotfan/metrics/)",
                    ha="center", va="center", transform=ax_cpu.transAxes, color="gray")
    if with_gpus:  # one line per VM: the mean of its GPUs, so a VM with idle GPUs stands out
        ax_gpu = axes[3]
        ax_gpu.set_title("GPU use per host (mean of its GPUs)", loc="left", fontsize=11)
        ax_gpu.set_ylabel("GPU busy %")
        ax_gpu.set_ylim(0, 105)
        for h, samples in sorted(metrics.items()):
            if any(_gpu_use(s) is not None for s in samples):
                _series(ax_gpu, samples, lambda s: _gpu_use(s) if _gpu_use(s) is not None else np.nan, start,
                        scale, colors.get(h, "gray"), h)
    axes[-1].set_xlabel(f"time since the first task started ({unit})")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    pad = 0.02 * span_s / scale
    ax_all.set_xlim(-pad, span_s / scale + pad)
    ok, bad = len(ok_ends), len(bad_ends)
    fig.suptitle(f"{task}: {ok} tasks on {len(names)} host(s) in {_duration(span_s)} "
                 f"({_rate(ok, span_s)})" + (f", {bad} failed executions" if bad else "")
                 + f"\nstarted {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(start))}",
                 fontsize=12, x=0.01, ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _series(ax: Any, samples: list[dict[str, Any]], value: Any, start: float, scale: float, color: str,
            label: str) -> None:
    """One host's samples as a line; a VM that recorded nothing for a while (preempted, stopped)
    is drawn as a gap."""
    # A sample covers the seconds before its time stamp: draw it at their middle.
    t = (np.array([s["t"] - s.get("seconds", 0.0) / 2 for s in samples]) - start) / scale
    y = np.array([value(s) for s in samples], dtype=float)
    t, y = _thin(t, y)
    if len(t) > 2:
        steps = np.diff(t)
        gaps = np.flatnonzero(steps > METRICS_GAP_FACTOR * np.median(steps))
        t, y = np.insert(t, gaps + 1, t[gaps]), np.insert(y, gaps + 1, np.nan)
    ax.plot(t, y, color=color, lw=1.3, marker="." if len(t) < 60 else None, ms=4, label=label)


def _rate(n: int, seconds: float) -> str:
    per_s = n / seconds if seconds > 0 else 0.0
    return f"{per_s:.1f} tasks/s" if per_s >= 1 else f"{60 * per_s:.1f} tasks/min"


def _color(i: int) -> str:
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray", "navy", "darkred", "darkgreen", "gold",
               "teal", "indigo", "salmon"]
    return palette[i % len(palette)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def _html(report: Report, root: str, png: bytes, has_metrics: bool) -> str:
    esc = html.escape
    span = max(report.end - report.start, 1e-9)
    with_gpus = any(h.gpu_mean is not None for h in report.hosts)
    rows = "\n".join(
        f"<tr><td>{esc(h.host)}</td><td>{h.tasks}</td><td>{h.failures}</td>"
        f"<td>{h.rate:.1f}</td><td>{_duration(h.busy_s)}</td><td>{_pct(h.cpu_mean)}</td>"
        f"<td>{_pct(h.iowait_mean)}</td>" + (f"<td>{_pct(h.gpu_mean)}</td>" if with_gpus else "") +
        f"<td>{time.strftime('%H:%M:%S', time.gmtime(h.last)) if h.last else ''}</td></tr>"
        for h in report.hosts)
    note = "" if has_metrics else (
        "<p class=note>No CPU samples were recorded for this run: CPU columns are empty.</p>")
    data = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(report.task)}: run report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
.note {{ color: #666; }}
</style></head><body>
<h1>{esc(report.task)}</h1>
<p>Run root <code>{esc(root)}</code>: {report.tasks} tasks succeeded and
{report.failures} executions failed on {len(report.hosts)} host(s), from
{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(report.start))} to
{time.strftime('%H:%M:%S UTC', time.gmtime(report.end))} ({_duration(span)},
{_rate(report.tasks, span)}). Written
{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>
<a href="{esc(report.png.name)}"><img alt="tasks completed over time per host, and CPU use per host"
 src="data:image/png;base64,{data}"></a>
<table>
<tr><th>host</th><th>tasks</th><th>failures</th><th>tasks/min</th><th>task time</th>
<th>mean CPU %</th><th>mean iowait %</th>{"<th>mean GPU %</th>" if with_gpus else ""}<th>last task ended (UTC)</th></tr>
{rows}
</table>
{note}
</body></html>
"""
