"""A small SFTP (version 3) client that keeps many requests in flight on one session.

The session runs over a command's stdin and stdout, normally OpenSSH's
`ssh ... -s user@host sftp`: OpenSSH does the cryptography, this module only frames
requests. The server answers one session's requests in order; sending a batch before
reading any answer turns N round trips into about one (docs/design.md, "Publishing on a
network root"). Only what the engine needs is here: open, write, close, rename, remove,
lstat, mkdir; open to read, fstat and read (tasks.fetch); and for `fab push`
(cluster.sftp_pipeline, cluster.sftp_ranges): open to overwrite or to write in place,
fsetstat, posix-rename, and a stream of requests too long to hold in memory at once.
"""
from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

VERSION = 3
HANDSHAKE_TIMEOUT_S = 30.0  # the ssh login and the server's VERSION answer
REPLY_TIMEOUT_S = 60.0  # no answer at all for this long: the session is dead
EXIT_WAIT_S = 2.0  # a session whose output ended gets this long to exit, so what it said can be read
MAX_INFLIGHT = 64  # requests sent and not yet answered, at most
WRITE_BLOCK = 32 * 1024  # bytes per WRITE request (every server takes 32 KiB)
STREAM_FLUSH_BYTES = 1 << 20  # a stream's requests are sent once this many bytes of them are drawn

# Packet types (draft-ietf-secsh-filexfer-02, the version OpenSSH speaks).
INIT, VERSION_REPLY, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT = 1, 2, 3, 4, 5, 6, 7, 8
FSETSTAT = 10
OPENDIR, READDIR, REMOVE, MKDIR, RENAME = 11, 12, 13, 14, 18
EXTENDED = 200
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
# Open flags and status codes.
FXF_READ = 0x01
FXF_WRITE, FXF_CREAT, FXF_TRUNC, FXF_EXCL = 0x02, 0x08, 0x10, 0x20
OK, EOF, NO_SUCH_FILE, PERMISSION_DENIED, FAILURE = 0, 1, 2, 3, 4
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME = 0x01, 0x02, 0x04, 0x08


T = TypeVar("T")


class SessionLost(OSError):
    """The session ended or stopped answering: nothing more can be sent on it."""

    def __str__(self) -> str:  # "the session ended (...)", not "[Errno 0] the session ended (...)"
        return self.strerror if self.errno == 0 and self.strerror else super().__str__()


@dataclass(frozen=True)
class Reply:
    """One answer: a STATUS code (OK for HANDLE and ATTRS answers) and its payload."""

    kind: int  # STATUS, HANDLE, NAME or ATTRS
    code: int  # the STATUS code; OK for any other kind
    message: str  # the server's text for a STATUS
    data: bytes  # a HANDLE's handle, a DATA's bytes, an ATTRS' encoded attributes
    names: tuple[str, ...] = ()  # a NAME's file names (a READDIR's page)

    @property
    def ok(self) -> bool:
        return self.code == OK


@dataclass(frozen=True)
class Request:
    """One request to send: its type and its encoded fields (after the id)."""

    kind: int
    body: bytes


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def open_create(path: str, mode: int = 0o644) -> Request:
    """Create `path` for writing; fails if it exists (O_CREAT|O_EXCL)."""
    return Request(OPEN, _string(os.fsencode(path)) + struct.pack(
        ">III", FXF_WRITE | FXF_CREAT | FXF_EXCL, ATTR_PERMISSIONS, mode))


@dataclass(frozen=True)
class Attrs:
    """What an ATTRS answer says of a file (None: the server left it out)."""

    size: int | None
    mode: int | None  # st_mode: type and permission bits
    mtime: int | None


def attrs(reply: Reply) -> Attrs:
    """The attributes in an ATTRS answer (to an FSTAT or LSTAT)."""
    p, at = reply.data, 4
    flags, = struct.unpack_from(">I", p)
    size = mode = mtime = None
    if flags & ATTR_SIZE:
        size, = struct.unpack_from(">Q", p, at)
        at += 8
    at += 8 if flags & ATTR_UIDGID else 0
    if flags & ATTR_PERMISSIONS:
        mode, = struct.unpack_from(">I", p, at)
        at += 4
    if flags & ATTR_ACMODTIME:
        _, mtime = struct.unpack_from(">II", p, at)
    return Attrs(size, mode, mtime)


def open_read(path: str) -> Request:
    """Open `path` for reading."""
    return Request(OPEN, _string(os.fsencode(path)) + struct.pack(">II", FXF_READ, 0))


def fstat(handle: bytes) -> Request:
    return Request(FSTAT, _string(handle))


def read(handle: bytes, offset: int, length: int) -> Request:
    """Up to `length` bytes at `offset`: a DATA answer, or STATUS EOF at the end."""
    return Request(READ, _string(handle) + struct.pack(">QI", offset, length))


def open_write(path: str, mode: int = 0o644) -> Request:
    """Open `path` for writing from its start: created, or emptied if it exists (O_CREAT|O_TRUNC)."""
    return Request(OPEN, _string(os.fsencode(path)) + struct.pack(
        ">III", FXF_WRITE | FXF_CREAT | FXF_TRUNC, ATTR_PERMISSIONS, mode))


def open_in_place(path: str, mode: int = 0o644) -> Request:
    """Open `path` for writing at any offset, keeping what it holds: created if missing (O_CREAT)."""
    return Request(OPEN, _string(os.fsencode(path)) + struct.pack(">III", FXF_WRITE | FXF_CREAT, ATTR_PERMISSIONS, mode))


def fsetstat(handle: bytes, *, mode: int, mtime: int) -> Request:
    """Set an open file's permission bits, and its access and modification times to `mtime`."""
    return Request(FSETSTAT, _string(handle) + struct.pack(
        ">IIII", ATTR_PERMISSIONS | ATTR_ACMODTIME, mode, mtime & 0xFFFFFFFF, mtime & 0xFFFFFFFF))


def posix_rename(old: str, new: str) -> Request:
    """OpenSSH's posix-rename@openssh.com: rename(2), an atomic replace of `new` if it exists."""
    return Request(EXTENDED, _string(b"posix-rename@openssh.com") + _string(os.fsencode(old))
                   + _string(os.fsencode(new)))


def statvfs(path: str) -> Request:
    """OpenSSH's statvfs@openssh.com: the filesystem under `path` (read with `fs_stats`)."""
    return Request(EXTENDED, _string(b"statvfs@openssh.com") + _string(os.fsencode(path)))


@dataclass(frozen=True)
class FsStats:
    """The fields of a statvfs@openssh.com answer that say which filesystem, and how full."""

    free_bytes: int  # f_bavail x f_frsize: what this user may still write
    fsid: int  # f_fsid: the filesystem's id on the server
    read_only: bool  # ST_RDONLY in f_flag


def fs_stats(reply: Reply) -> FsStats | None:
    """A statvfs answer's fields, or None for a refusal (or a server without the extension)."""
    if not reply.ok or len(reply.data) < 88:
        return None
    (_bsize, frsize, _blocks, _bfree, bavail, _files, _ffree, _favail, fsid, flag,
     _namemax) = struct.unpack_from(">11Q", reply.data)
    return FsStats(free_bytes=bavail * frsize, fsid=fsid, read_only=bool(flag & 1))


def write(handle: bytes, offset: int, data: bytes) -> Request:
    return Request(WRITE, _string(handle) + struct.pack(">Q", offset) + _string(data))


def close(handle: bytes) -> Request:
    return Request(CLOSE, _string(handle))


def rename(old: str, new: str) -> Request:
    """Plain SFTP rename: OpenSSH's server does it as link + unlink for a regular file, so it
    fails (FAILURE) when `new` exists: a create-only publish in one request."""
    return Request(RENAME, _string(os.fsencode(old)) + _string(os.fsencode(new)))


def remove(path: str) -> Request:
    return Request(REMOVE, _string(os.fsencode(path)))


def lstat(path: str) -> Request:
    return Request(LSTAT, _string(os.fsencode(path)))


def opendir(path: str) -> Request:
    return Request(OPENDIR, _string(os.fsencode(path)))


def readdir(handle: bytes) -> Request:
    """The next page of names (OpenSSH: up to 100); EOF once there are no more."""
    return Request(READDIR, _string(handle))


def mkdir(path: str, mode: int = 0o755) -> Request:
    return Request(MKDIR, _string(os.fsencode(path)) + struct.pack(">II", ATTR_PERMISSIONS, mode))


class Session:
    """One SFTP session over `argv`'s stdin and stdout."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._err = tempfile.TemporaryFile()  # what ssh says (a pipe nobody reads could fill)
        try:
            self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._err, bufsize=0, start_new_session=True)
        except OSError as e:
            self._err.close()
            raise SessionLost(e.errno or 0, f"cannot start {argv[0]!r}: {e.strerror}") from e
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin, self.proc.stdout
        self._buf = bytearray()
        self._next_id = 0
        self.sent = 0  # requests sent on this session (the benchmark counts them)
        self._send_raw(struct.pack(">BI", INIT, VERSION))
        kind, _ = self._packet(time.monotonic() + HANDSHAKE_TIMEOUT_S)
        if kind != VERSION_REPLY:
            self.close()
            raise SessionLost(0, f"the server answered INIT with packet type {kind}")

    def close(self) -> None:
        """End the session and its process (by pid: it runs in a session of its own)."""
        if self.proc.poll() is None:
            for stream in (self._in,):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        self._err.close()

    def why_lost(self) -> str:
        """What the session's process said when it ended (its stderr tail), if it has."""
        if self.proc.poll() is None:
            return ""
        try:
            self._err.seek(0)
            return self._err.read()[-500:].decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def run(self, requests: Sequence[Request]) -> list[Reply]:
        """Send every request, at most MAX_INFLIGHT unanswered at once; the answers, in order."""
        replies: dict[int, Reply] = {}
        first = self._next_id + 1
        sent = 0
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while len(replies) < len(requests):
            batch = []
            while sent < len(requests) and sent - len(replies) < MAX_INFLIGHT:
                r = requests[sent]
                self._next_id += 1
                body = struct.pack(">BI", r.kind, self._next_id) + r.body
                batch.append(struct.pack(">I", len(body)) + body)
                sent += 1
                self.sent += 1
            if batch:
                self._send_raw_framed(b"".join(batch))
            kind, payload = self._packet(deadline)
            rid, = struct.unpack_from(">I", payload)
            replies[rid - first] = _reply(kind, payload[4:])
            deadline = time.monotonic() + REPLY_TIMEOUT_S
        return [replies[i] for i in range(len(requests))]

    def stream(self, requests: Iterable[tuple[Request, T]]) -> Iterator[tuple[T, Reply]]:
        """Send (request, tag) pairs as they are drawn, at most MAX_INFLIGHT unanswered at once;
        yield (tag, answer) in the requests' order. The next requests are drawn only after an
        answer was yielded, so what the caller learns from it can shape them."""
        pending = iter(requests)
        tags: dict[int, T] = {}
        replies: dict[int, Reply] = {}
        nxt = self._next_id + 1  # the id of the next answer to yield
        drained = False
        while True:
            batch: list[bytes] = []
            held = 0
            while not drained and len(tags) < MAX_INFLIGHT:
                try:
                    r, tag = next(pending)
                except StopIteration:
                    drained = True
                    break
                self._next_id += 1
                tags[self._next_id] = tag
                body = struct.pack(">BI", r.kind, self._next_id) + r.body
                batch.append(struct.pack(">I", len(body)) + body)
                held += len(body)
                self.sent += 1
                if held >= STREAM_FLUSH_BYTES:  # big writes go as they come: one copy in memory at a time
                    self._send_raw_framed(b"".join(batch))
                    batch, held = [], 0
            if batch:
                self._send_raw_framed(b"".join(batch))
            if not tags:
                return
            kind, payload = self._packet(time.monotonic() + REPLY_TIMEOUT_S)
            rid, = struct.unpack_from(">I", payload)
            if rid not in tags:
                raise SessionLost(0, f"the server answered request {rid}, which is not in flight")
            replies[rid] = _reply(kind, payload[4:])
            while nxt in replies:
                yield tags.pop(nxt), replies.pop(nxt)
                nxt += 1

    # -- framing -----------------------------------------------------------------------
    def _send_raw(self, body: bytes) -> None:
        self._send_raw_framed(struct.pack(">I", len(body)) + body)

    def _send_raw_framed(self, data: bytes) -> None:
        try:
            self._in.write(data)
        except (OSError, ValueError) as e:
            raise SessionLost(0, f"the session ended ({self.why_lost() or e})") from e

    def _packet(self, deadline: float) -> tuple[int, bytes]:
        head = self._read(4, deadline)
        n, = struct.unpack(">I", head)
        body = self._read(n, deadline)
        return body[0], body[1:]

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._out], [], [], max(0.0, left))
            if not ready:
                raise SessionLost(0, f"no answer from the server in {REPLY_TIMEOUT_S:g} s")
            chunk = os.read(self._out.fileno(), 1 << 16)
            if not chunk:
                try:
                    self.proc.wait(timeout=EXIT_WAIT_S)  # so its last words are there to read
                except subprocess.TimeoutExpired:
                    pass
                raise SessionLost(0, f"the session ended ({self.why_lost() or 'no reason given'})")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def _reply(kind: int, payload: bytes) -> Reply:
    if kind == STATUS:
        code, = struct.unpack_from(">I", payload)
        n, = struct.unpack_from(">I", payload, 4)
        return Reply(kind, code, payload[8:8 + n].decode(errors="replace"), b"")
    if kind == HANDLE:
        n, = struct.unpack_from(">I", payload)
        return Reply(kind, OK, "", payload[4:4 + n])
    if kind == DATA:
        n, = struct.unpack_from(">I", payload)
        return Reply(kind, OK, "", payload[4:4 + n])
    if kind == NAME:
        return Reply(kind, OK, "", b"", _names(payload))
    return Reply(kind, OK, "", payload)


def _names(payload: bytes) -> tuple[str, ...]:
    """A NAME reply's file names: count, then (filename, longname, ATTRS) each."""
    count, = struct.unpack_from(">I", payload)
    at, out = 4, []
    for _ in range(count):
        n, = struct.unpack_from(">I", payload, at)
        out.append(os.fsdecode(payload[at + 4:at + 4 + n]))
        at += 4 + n
        n, = struct.unpack_from(">I", payload, at)  # longname: skipped
        at += 4 + n
        at = _skip_attrs(payload, at)
    return tuple(out)


def _skip_attrs(payload: bytes, at: int) -> int:
    flags, = struct.unpack_from(">I", payload, at)
    at += 4
    at += 8 if flags & 0x1 else 0  # size
    at += 8 if flags & 0x2 else 0  # uid, gid
    at += 4 if flags & 0x4 else 0  # permissions
    at += 8 if flags & 0x8 else 0  # atime, mtime
    if flags & 0x80000000:  # extended pairs
        count, = struct.unpack_from(">I", payload, at)
        at += 4
        for _ in range(2 * count):
            n, = struct.unpack_from(">I", payload, at)
            at += 4 + n
    return at
