"""A push's big files through several SFTP sessions at once, each session writing its own range.

One SSH session moves at most its channel window (2 MB on OpenSSH's sshd) per round trip:
40 MB/s at 50 ms, whatever the link can carry, for `sftp -b` and `scp` alike. A file of
RANGE_MIN_BYTES or more is cut into one range per session; each session (`ssh -s ... sftp`,
as in cluster.sftp_pipeline: OpenSSH does the crypto, tasks.sftp frames the requests) writes
its range into the same part file (`.NAME.SIZE-MTIME.rK.spotfan-part`) at its offsets, 64
writes in flight. Once the head has answered every write OK, the part gets the source's mode
and mtime and is renamed into place (posix-rename): a task never sees half of it.

Resuming: the size of a file written out of order says nothing of what it holds, so beside
the part a journal (`.NAME.SIZE-MTIME.rK.ranges.spotfan-part`) holds, for each range, how far
the head has answered its writes OK. A session writes its slot only after those answers (a
server answers one session's requests in order), so the journal never claims a byte that is
not there. The same command continues each range from its slot. A part without a valid
journal is started afresh, the journal first and the part emptied after, so a push killed
between the two leaves a journal that claims nothing.
"""
from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cluster.share import Login
from cluster.sftp_batch import BUFFER_BYTES
from cluster.sftp_pipeline import argv, say
from cluster.sides import PART_SUFFIX
from tasks import sftp

logger = logging.getLogger(__name__)

RANGE_MIN_BYTES = 64 << 20  # a file at least this big goes as ranges (smaller: sftp -b, one session)
SESSIONS = 4  # ranges of a file, each on its own session (4 measured best on 2 cores; see docs/benchmarks.md)
MAX_SESSIONS = 16
JOURNAL_EVERY_BYTES = 8 << 20  # a range's slot in the journal is brought up to date this often
RESUME_MIN_BYTES = 1 << 20  # a stopped copy with this much answered is kept to continue from
MAGIC = b"spotfanR"
HEADER = struct.Struct(">8sI")  # magic, number of ranges; then one ">Q" slot per range
SLOT = struct.Struct(">Q")


@dataclass(frozen=True)
class Big:
    """One file: its bytes in ranges to its part file, then renamed to `final` (absolute on the head)."""

    key: str  # the caller's name for it
    local: Path
    final: str
    size: int  # as listed: a file that reads otherwise changed while it was copied
    mtime: int  # set on the copy, with mode
    mode: int


@dataclass
class Outcome:
    """What became of the files given to `Ranges.send`."""

    done: set[str] = field(default_factory=set)  # keys of the files at their final path, whole
    resumed: set[str] = field(default_factory=set)  # of those, continued from a kept part
    failed: dict[str, str] = field(default_factory=dict)  # key -> what went wrong
    kept: list[str] = field(default_factory=list)  # part files kept to continue from (absolute on the head)


def bounds(size: int, ranges: int) -> list[tuple[int, int]]:
    """The [start, end) of each range of a file: about equal, each a whole number of writes."""
    step = -(-size // max(1, ranges))
    step = max(BUFFER_BYTES, -(-step // BUFFER_BYTES) * BUFFER_BYTES)
    return [(a, min(size, a + step)) for a in range(0, size, step)]


def names(final: str, size: int, mtime: int, ranges: int) -> tuple[str, str]:
    """The part file and the journal of a copy of this source version in this many ranges."""
    p = PurePosixPath(final)
    base = f".{p.name}.{size}-{mtime}.r{ranges}"
    return str(p.with_name(base + PART_SUFFIX)), str(p.with_name(base + ".ranges" + PART_SUFFIX))


def journal_bytes(slots: Sequence[int]) -> bytes:
    return HEADER.pack(MAGIC, len(slots)) + b"".join(SLOT.pack(s) for s in slots)


def parse_journal(data: bytes, spans: Sequence[tuple[int, int]]) -> list[int] | None:
    """Each range's answered end from a journal, or None if it is not one for these ranges."""
    if len(data) != HEADER.size + SLOT.size * len(spans):
        return None
    magic, n = HEADER.unpack_from(data)
    if magic != MAGIC or n != len(spans):
        return None
    slots = [SLOT.unpack_from(data, HEADER.size + SLOT.size * i)[0] for i in range(n)]
    return slots if all(a <= s <= b for s, (a, b) in zip(slots, spans)) else None


class _Halt(Exception):
    """The file's copy stopped; the reason is in the copy's `trouble`."""


class _Copy:
    """One file on its way: its ranges, how far each has been answered and journaled."""

    def __init__(self, big: Big, spans: list[tuple[int, int]], part: str, journal: str, starts: list[int]) -> None:
        self.big, self.spans, self.part, self.journal = big, spans, part, journal
        self.answered = list(starts)  # per range: every byte before this was answered OK
        self.journaled = list(starts)  # per range: what its journal slot says
        self.todo: deque[int] = deque(i for i, (s, (_, b)) in enumerate(zip(starts, spans)) if s < b)
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.trouble = ""

    def stop(self, why: str) -> None:
        with self.lock:
            self.trouble = self.trouble or why
        self.halt.set()

    def next_range(self) -> int | None:
        with self.lock:
            return self.todo.popleft() if self.todo and not self.halt.is_set() else None

    def kept_bytes(self) -> int:
        return sum(j - a for j, (a, _) in zip(self.journaled, self.spans))


class Ranges:
    """Big files over a few SFTP sessions, one file at a time, its ranges spread over them.
    Made without I/O; `start` logs the sessions in (while the caller lists and compares);
    use it with `with`: what was started is ended."""

    def __init__(self, login: Login, *, sessions: int = SESSIONS) -> None:
        self.login, self.sessions = login, max(1, min(MAX_SESSIONS, sessions))
        self._pool: ThreadPoolExecutor | None = None
        self._started: list[Future[sftp.Session]] = []
        self._live: list[sftp.Session] = []
        self._stop = threading.Event()

    def __enter__(self) -> Ranges:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.sessions, thread_name_prefix="sftp-ranges")
            self._started = [self._pool.submit(sftp.Session, argv(self.login)) for _ in range(self.sessions)]

    def stop(self) -> None:
        """Send no more writes (those in flight are answered, and journaled, first)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self._sessions()
        for s in self._live:
            s.close()
        self._live = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _sessions(self) -> str:
        """Collect the logins started; what the last one that failed said."""
        why = ""
        for f in self._started:
            try:
                self._live.append(f.result())
            except sftp.SessionLost as e:
                why = f"cannot start an SFTP session with the head: {e}"
        self._started = []
        return why

    def send(self, bigs: Sequence[Big], on_bytes: Callable[[int], None],
             on_done: Callable[[Big], None]) -> Outcome:
        """Copy these files, each whole or not at all; `on_bytes(n)` as the head answers writes."""
        self.start()
        out = Outcome()
        why = self._sessions()
        for big in bigs:
            if self._stop.is_set():
                break
            if not self._live:
                out.failed[big.key] = why or "no SFTP session with the head"
                continue
            try:
                self._one(big, on_bytes, out)
            except _Halt as e:
                out.failed[big.key] = str(e)
            except sftp.SessionLost as e:
                why = f"the SFTP session with the head ended: {e}"
                out.failed[big.key] = why
            if big.key in out.done:
                on_done(big)
        return out

    # -- one file ------------------------------------------------------------------------

    def _one(self, big: Big, on_bytes: Callable[[int], None], out: Outcome) -> None:
        spans = bounds(big.size, self.sessions)
        part, journal = names(big.final, big.size, big.mtime, len(spans))
        first = self._live[0]
        starts = self._resume_from(first, part, journal, spans)
        if starts is None:
            starts = [a for a, _ in spans]
            self._fresh(first, part, journal, starts)
        elif any(s > a for s, (a, _) in zip(starts, spans)):
            out.resumed.add(big.key)
            logger.info("%s: continuing %d of %d bytes", big.final, sum(b - s for s, (_, b) in zip(starts, spans)),
                        big.size)
        copy = _Copy(big, spans, part, journal, starts)
        assert self._pool is not None
        workers = [self._pool.submit(self._work, s, copy, on_bytes) for s in self._live]
        lost = []
        for s, w in zip(list(self._live), workers):
            try:
                w.result()
            except sftp.SessionLost as e:
                copy.stop(f"the SFTP session with the head ended: {e}")
                lost.append(s)
        for s in lost:
            self._live.remove(s)
            s.close()
        if not copy.trouble and all(got == b for got, (_, b) in zip(copy.answered, spans)):
            if _unchanged(big):
                self._finish(copy, out)
                return
            copy.stop(f"{big.local} changed while it was copied (its size or mtime is not what was listed): "
                      "run the same command again")
            copy.journaled = [a for a, _ in spans]  # what was copied is of another version: not kept
        out.failed[big.key] = copy.trouble or "interrupted"
        self._leave(copy, out)

    def _resume_from(self, s: sftp.Session, part: str, journal: str, spans: list[tuple[int, int]]) -> list[int] | None:
        """Each range's start from the journal a stopped copy left, if it and its part are there."""
        opened, there = s.run([sftp.open_read(journal), sftp.lstat(part)])
        if not opened.ok:
            return None
        want = HEADER.size + SLOT.size * len(spans)
        got, _ = s.run([sftp.read(opened.data, 0, want + 1), sftp.close(opened.data)])
        slots = parse_journal(got.data, spans) if got.ok and there.ok else None
        if slots is None:
            return None
        # A part cut shorter than what the journal says it holds (by hand, or a full disk
        # that lost a write-back) is not trusted either.
        reach = max((sl for sl, (a, _) in zip(slots, spans) if sl > a), default=0)
        size = sftp.attrs(there).size
        return slots if size is not None and size >= reach else None

    def _fresh(self, s: sftp.Session, part: str, journal: str, starts: list[int]) -> None:
        """A journal that claims nothing, then an empty part (in that order: see the module)."""
        j, = s.run([sftp.open_write(journal, 0o600)])
        if not j.ok:
            raise _refused(f"cannot create {journal} on the head", j)
        wrote, closed, p = s.run([sftp.write(j.data, 0, journal_bytes(starts)), sftp.close(j.data),
                                  sftp.open_write(part, 0o600)])
        if p.ok:
            s.run([sftp.close(p.data)])
        for r in (wrote, closed, p):
            if not r.ok:
                raise _refused(f"cannot create {part} on the head", r)

    def _work(self, s: sftp.Session, copy: _Copy, on_bytes: Callable[[int], None]) -> None:
        """One session: ranges of the file until none is left (or the copy stops)."""
        i = copy.next_range()
        if i is None:
            return
        ph, jh = s.run([sftp.open_in_place(copy.part, 0o600), sftp.open_in_place(copy.journal, 0o600)])
        handles = [r.data for r in (ph, jh) if r.ok]
        try:
            if not (ph.ok and jh.ok):
                bad = ph if not ph.ok else jh
                copy.stop(str(_refused(f"cannot open {copy.part} on the head", bad)))
                return
            while i is not None:
                self._range(s, copy, i, ph.data, jh.data, on_bytes)
                i = copy.next_range()
        finally:
            if handles and s.proc.poll() is None:
                try:
                    s.run([sftp.close(h) for h in handles])
                except sftp.SessionLost:
                    pass  # what ended the session is what the caller hears of

    def _range(self, s: sftp.Session, copy: _Copy, i: int, ph: bytes, jh: bytes,
               on_bytes: Callable[[int], None]) -> None:
        """Write range `i` from where it was answered up to; its journal slot follows the answers.
        Never leaves answers unread on the session: a stop only ends the sending."""
        end = copy.spans[i][1]
        slot_at = HEADER.size + SLOT.size * i
        big = copy.big

        def requests(f) -> Iterator[tuple[sftp.Request, int]]:  # tag: bytes written, or -1 for the journal
            at = copy.answered[i]
            while at < end and not copy.halt.is_set() and not self._stop.is_set():
                n = min(BUFFER_BYTES, end - at)
                data = f.read(n)
                if len(data) != n:
                    copy.stop(f"{big.local} changed while it was copied ({big.size} bytes listed, fewer read): "
                              "run the same command again")
                    return
                yield sftp.write(ph, at, data), n
                at += n
                if copy.answered[i] - copy.journaled[i] >= JOURNAL_EVERY_BYTES:
                    copy.journaled[i] = copy.answered[i]
                    yield sftp.write(jh, slot_at, SLOT.pack(copy.answered[i])), -1

        try:
            with open(big.local, "rb") as f:
                f.seek(copy.answered[i])
                for n, reply in s.stream(requests(f)):
                    if not reply.ok:
                        copy.stop(str(_refused(f"the head refused {copy.part}", reply)))
                    elif n > 0:
                        copy.answered[i] += n
                        on_bytes(n)
        except OSError as e:
            if isinstance(e, sftp.SessionLost):
                raise
            copy.stop(f"cannot read {big.local}: {e.strerror or e}")
            return
        # Every answer is in: the slot says exactly how far this range got (whatever stopped it).
        done, = s.run([sftp.write(jh, slot_at, SLOT.pack(copy.answered[i]))])
        if done.ok:
            copy.journaled[i] = copy.answered[i]
        else:
            copy.stop(str(_refused(f"cannot update {copy.journal} on the head", done)))

    def _finish(self, copy: _Copy, out: Outcome) -> None:
        """Every byte answered OK: mode and mtime, then into place whole; the journal goes."""
        big, s = copy.big, self._live[0]
        h, = s.run([sftp.open_in_place(copy.part, 0o600)])
        if not h.ok:
            out.failed[big.key] = str(_refused(f"cannot open {copy.part} on the head", h))
            return
        stat, closed, moved = s.run([sftp.fsetstat(h.data, mode=big.mode, mtime=big.mtime), sftp.close(h.data),
                                     sftp.posix_rename(copy.part, big.final)])
        bad = next((r for r in (stat, closed, moved) if not r.ok), None)
        if bad is not None:
            out.failed[big.key] = str(_refused(f"cannot put {copy.part} in place as {big.final}", bad))
            out.kept.append(copy.part)  # every byte is there: the same command renames it
            return
        out.done.add(big.key)
        gone, = s.run([sftp.remove(copy.journal)])
        if not gone.ok:
            logger.info("%s: not removed: %s", copy.journal, gone.message)

    def _leave(self, copy: _Copy, out: Outcome) -> None:
        """A copy that stopped: kept to continue from if enough of it is journaled, else removed."""
        if copy.kept_bytes() >= RESUME_MIN_BYTES:
            out.kept.append(copy.part)
            return
        if self._live:
            try:
                self._live[0].run([sftp.remove(copy.journal), sftp.remove(copy.part)])
            except sftp.SessionLost as e:
                logger.info("%s: not removed: %s", copy.part, e)


def _unchanged(big: Big) -> bool:
    """Whether the source is still the version listed (a file that grew would be cut short)."""
    try:
        st = big.local.stat()
    except OSError:
        return False
    return st.st_size == big.size and int(st.st_mtime) == big.mtime


def _refused(what: str, reply: sftp.Reply) -> _Halt:
    return _Halt(f"{what}: {say(reply)}")  # the pipeline's words for the same refusals
