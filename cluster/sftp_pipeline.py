"""The small files of a `fab push` through a few SFTP sessions, each with many files in flight.

`sftp -b` (cluster.sftp_batch) copies one file at a time: open, write, fsetstat, close, each
waiting for its answer, so a file of 100 KB costs several round trips. Here each session
(`ssh -s ... sftp`: OpenSSH does the crypto, tasks.sftp frames the requests) sends the OPENs
of a window of files at once; as their handles come back, each file's WRITEs, its FSETSTAT
(mode and mtime, as `put -p` sets them) and CLOSE go out together with the next window's
OPENs, so a window costs about one round trip. A file is written to its part name and,
once the server has answered every one of its writes OK, renamed into place (posix-rename:
an atomic replace) with the next window's requests: a write refused (a full disk) never puts
a partial file at a final path, and the partial copy is removed. Inside a staged folder that
is renamed into place whole afterwards, a file goes straight to its name. The server answers
every request, so each file's fate is known from its answers; cluster.transfer decides what
to copy and reports. Logins trust only the cluster's known_hosts and key (sftp_batch.options).
"""
from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cluster.share import Login
from cluster.sftp_batch import BUFFER_BYTES, options
from tasks import sftp

logger = logging.getLogger(__name__)

SESSIONS = 2  # sessions of a push (2 measured best on 2 cores: each is an ssh, an sshd and an sftp-server)
MAX_BYTES = 1 << 20  # files smaller than this go through here (bigger ones: sftp -b, resumable)
WINDOW_FILES = 32  # files opened at once per session
WINDOW_BYTES = 8 << 20  # ... and at most this many of their bytes read into memory


@dataclass(frozen=True)
class Send:
    """One file: its bytes to `part`, then (unless part == final) renamed to `final`."""

    key: str  # the caller's name for it
    local: Path
    part: str  # absolute path on the head
    final: str
    size: int  # as listed: a file that reads otherwise changed while it was copied
    mtime: int  # set on the copy, with mode
    mode: int


@dataclass(frozen=True)
class _Open:
    send: Send
    data: bytes


def available() -> bool:
    return shutil.which("ssh") is not None


def argv(login: Login) -> list[str]:
    """`ssh` to the head's SFTP subsystem as this login only."""
    return ["ssh", "-F", "/dev/null", "-x", "-a", "-T", "-p", str(login.port), "-i", str(login.key),
            *options(login), "-s", "--", f"{login.user}@{login.address}", "sftp"]


class Pipeline:
    """Files sent over a few SFTP sessions at once; each session takes the next window of files
    from one queue, so a slow session does not hold the others back. Made without I/O; `start`
    logs the sessions in (while the caller lists and compares), `send` fills the queue; use it
    with `with`: what was started is ended."""

    def __init__(self, login: Login, *, sessions: int = SESSIONS) -> None:
        self.login, self.sessions = login, max(1, sessions)
        self._pool: ThreadPoolExecutor | None = None
        self._started: list[Future[sftp.Session]] = []
        self._todo: deque[Send] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.done: set[str] = set()  # keys of the files at their final path, whole
        self.failed: dict[str, str] = {}  # key -> what went wrong
        self._why = ""  # why the last session that ended early did

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start logging the sessions in (in threads of their own)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.sessions, thread_name_prefix="sftp-pipeline")
            self._started = [self._pool.submit(sftp.Session, argv(self.login)) for _ in range(self.sessions)]

    def send(self, sends: Sequence[Send], on_done: Callable[[Send], None]) -> list[Future[None]]:
        """Send these files; each future ends with its session. `on_done(send)` as each file is in place."""
        self.start()
        assert self._pool is not None
        self._todo.extend(sends)
        started, self._started = self._started, []
        return [self._pool.submit(self._run_session, s, on_done) for s in started]

    def stop(self) -> None:
        """Send no more windows (those in flight finish)."""
        self._stop.set()

    def close(self) -> None:
        """Stop, wait for the sessions (each bounded by tasks.sftp's timeouts) and end them."""
        self.stop()
        for f in self._started:  # started, never given files
            try:
                f.result().close()
            except sftp.SessionLost:
                pass
        self._started = []
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def settle(self) -> None:
        """Once every session has ended: the files none took fail with the last session's
        error (after `stop`, an interrupted push, the caller says they were not sent)."""
        with self._lock:
            while self._todo:
                self.failed[self._todo.popleft().key] = self._why or "no SFTP session took it"

    def _run_session(self, started: Future[sftp.Session], on_done: Callable[[Send], None]) -> None:
        """One session: windows of files until none is left. One that could not start leaves
        the files to the others; one that is lost fails the files it held."""
        try:
            session = started.result()
        except sftp.SessionLost as e:
            self._lost(f"cannot start an SFTP session with the head: {e}", [])
            return
        held: list[_Open] = []
        try:
            self._run(session, held, on_done)
        except sftp.SessionLost as e:
            self._lost(f"the SFTP session with the head ended: {e}", held)
        finally:
            session.close()

    def _run(self, session: sftp.Session, held: list[_Open], on_done: Callable[[Send], None]) -> None:
        window = self._window()
        held[:] = window
        opens = session.run([_open(o) for o in window])
        written: list[_Open] = []  # every byte answered OK: renamed into place with the next requests
        while window or written:
            nxt = self._window()
            held[:] = written + window + nxt
            reqs: list[sftp.Request] = [sftp.posix_rename(o.send.part, o.send.final) for o in written]
            plans: list[tuple[_Open, int]] = []  # each open file and how many requests it sent
            for o, reply in zip(window, opens):
                if not reply.ok:
                    self._failed(o.send, f"cannot create {o.send.part} on the head: {say(reply)}")
                    continue
                n = len(reqs)
                for at in range(0, len(o.data), BUFFER_BYTES):
                    reqs.append(sftp.write(reply.data, at, o.data[at:at + BUFFER_BYTES]))
                reqs += [sftp.fsetstat(reply.data, mode=o.send.mode, mtime=o.send.mtime), sftp.close(reply.data)]
                plans.append((o, len(reqs) - n))
            replies = session.run(reqs + [_open(o) for o in nxt])
            for o, reply in zip(written, replies):
                if reply.ok:
                    self._done(o.send, on_done)
                else:
                    self._failed(o.send, f"cannot rename {o.send.part} to {o.send.final} on the head: {say(reply)}")
            at = len(written)
            written, gone = [], []
            for o, n in plans:
                bad = next((r for r in replies[at:at + n] if not r.ok), None)
                at += n
                if bad is not None:  # never renamed into place; its partial copy is removed below
                    self._failed(o.send, f"the head refused {o.send.part}: {say(bad)}")
                    gone.append(o.send.part)
                elif o.send.part == o.send.final:
                    self._done(o.send, on_done)
                else:
                    written.append(o)
            if gone:  # no half-written file is left behind (nor does it hold space on a full disk)
                session.run([sftp.remove(path) for path in gone])
            window, opens = nxt, replies[at:]

    def _done(self, s: Send, on_done: Callable[[Send], None]) -> None:
        with self._lock:
            self.done.add(s.key)
        on_done(s)

    def _window(self) -> list[_Open]:
        """The next files to send, read into memory; a file that cannot be read, or reads
        otherwise than listed, fails here."""
        out: list[_Open] = []
        held = 0
        while len(out) < WINDOW_FILES and held < WINDOW_BYTES and not self._stop.is_set():
            with self._lock:
                if not self._todo:
                    break
                s = self._todo.popleft()
            try:
                with open(s.local, "rb") as f:
                    data = f.read(s.size + 1)
            except OSError as e:
                self._failed(s, f"cannot read {s.local}: {e.strerror or e}")
                continue
            if len(data) != s.size:
                self._failed(s, f"{s.local} changed while it was copied ({s.size} bytes listed, {len(data)} "
                                "read): run the same command again")
                continue
            out.append(_Open(s, data))
            held += len(data)
        return out

    def _failed(self, s: Send, why: str) -> None:
        with self._lock:
            self.failed[s.key] = why

    def _lost(self, why: str, held: Sequence[_Open]) -> None:
        logger.info("%s", why)
        with self._lock:
            self._why = why
            for o in held:
                if o.send.key not in self.done:
                    self.failed.setdefault(o.send.key, why)


def _open(o: _Open) -> sftp.Request:
    """Created (or emptied: an interrupted push left it) writable by its owner; FSETSTAT sets its mode."""
    return sftp.open_write(o.send.part, o.send.mode | 0o600)


def say(reply: sftp.Reply) -> str:
    """A refusal as a person reads it: the server's text, and what usually causes it."""
    text = reply.message or f"SFTP status {reply.code}"
    if reply.code == sftp.PERMISSION_DENIED:
        return f"{text} (the share's user may not write there)"
    if reply.code == sftp.FAILURE:
        return f"{text} (is the head's disk full? `df` on the head shows it)"
    return text
