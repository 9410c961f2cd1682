"""The laptop's view of the shared directory on the head, over SFTP with a verified host key.

The laptop never mounts the share: it reads and writes the few files the cluster layer
keeps there (cluster.records) and ships project code, all through one SFTP session as
the head's jailed user (cluster.jail), to whom the share is `/share`. Every path given
to a `Share` is relative to the share's root; every read is bounded (the share is
untrusted input).
"""
from __future__ import annotations

import errno
import io
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko

from cluster.errors import ClusterError, RecordError
from cluster.records import MAX_RECORD_BYTES
from cluster.ssh import CONNECT_ATTEMPTS, Host, Remote

logger = logging.getLogger(__name__)

MAX_SHIP_FILES = 10_000  # `fab run --ship DIR` is for code, not data


@dataclass(frozen=True)
class Login:
    """How an OpenSSH client logs in to the head as the share's user (what `fab push` hands to `sftp`)."""

    user: str
    address: str
    port: int
    key: Path  # the laptop's private key
    known_hosts: Path  # the cluster's known_hosts: the only host keys trusted
    connect_timeout: float
    kex_algorithms: str = ""  # OpenSSH's KexAlgorithms (cluster.toml ssh.kex_algorithms); "" = its default


class Share:
    """Files under the head's shared directory. Connects on first use; use it with `with`."""

    def __init__(self, *, remote: Remote, head: Host, user: str, root: str, kex_algorithms: str = "") -> None:
        self._remote = remote
        self._kex = kex_algorithms
        self._head = head
        self._user = user
        self.root = PurePosixPath(root)
        self._conn = None
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._sftp = None

    def open(self, *, attempts: int = CONNECT_ATTEMPTS) -> Share:
        """Connect now unless connected (`attempts`: 1 where a missing head is no news)."""
        if self._sftp is None:
            self._conn = self._remote.open(self._head, user=self._user, attempts=attempts, refused=(
                f"head {self._head.address}:{self._head.port} refused {self._user!r} with the "
                "laptop key: the head's jailed SFTP user is not set up for this cluster; run "
                "`fab head-setup` and do what it prints on the head (the lab does it itself)"))
            self._sftp = self._remote.sftp(self._conn, self._head)
        return self

    @contextmanager
    def session(self) -> Iterator[paramiko.SFTPClient]:
        """Another SFTP session to the head, a channel of the share's connection (transfers run
        several at once: one session's requests are served in order), closed when the block ends."""
        self.open()
        assert self._conn is not None
        try:
            sftp = self._conn.client.open_sftp()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise ClusterError(f"head {self._head.address}:{self._head.port}: no more SFTP sessions: {e}") from e
        try:
            yield sftp
        finally:
            sftp.close()

    def login(self) -> Login:
        r = self._remote
        return Login(self._user, self._head.address, self._head.port, r.key, r.known_hosts, r.connect_timeout,
                     self._kex)

    @property
    def is_open(self) -> bool:
        return self._sftp is not None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        self.open()
        assert self._sftp is not None
        return self._sftp

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def makedirs(self, rel: str) -> None:
        parts = PurePosixPath(rel).parts
        for i in range(1, len(parts) + 1):
            try:
                self.sftp.mkdir(self.path("/".join(parts[:i])))
            except OSError:
                pass  # exists (SFTP reports it only as a generic failure)

    def read_text(self, rel: str, *, max_bytes: int = MAX_RECORD_BYTES) -> str | None:
        """The file's text, or None if it does not exist; one over `max_bytes` is refused unread."""
        try:
            with self.sftp.open(self.path(rel), "r") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        if len(data) > max_bytes:
            raise RecordError(f"refused {rel} on the share: more than {max_bytes} bytes")
        return data.decode("utf-8", errors="replace")

    def write_text(self, rel: str, text: str) -> None:
        """Write a file whole: a temporary next to it, then an atomic rename."""
        self.makedirs(str(PurePosixPath(rel).parent))
        tmp = f"{self.path(rel)}.tmp-{uuid.uuid4().hex[:8]}"
        self.sftp.putfo(io.BytesIO(text.encode()), tmp)
        self.sftp.posix_rename(tmp, self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names in a directory; empty if it does not exist."""
        try:
            return sorted(self.sftp.listdir(self.path(rel)))
        except FileNotFoundError:
            return []

    def exists(self, rel: str) -> bool:
        try:
            self.sftp.stat(self.path(rel))
            return True
        except FileNotFoundError:
            return False

    def ship(self, local: Path, rel: str = "") -> int:
        """Copy a local file or directory tree (code, not data) into the share; return files copied."""
        files = ship_files(local)
        base = local.parent  # `--ship proj` lands as ROOT/proj, `--ship prep.py` as ROOT/prep.py
        for f in files:
            target = PurePosixPath(rel) / f.relative_to(base).as_posix()
            self.makedirs(str(target.parent))
            self.sftp.put(str(f), self.path(str(target)))
            self.sftp.chmod(self.path(str(target)), stat.S_IMODE(os.stat(f).st_mode))
        return len(files)

    def tail(self, rel: str, *, max_bytes: int) -> str | None:
        """The last `max_bytes` of a file, or None if it does not exist."""
        try:
            with self.sftp.open(self.path(rel), "r") as f:
                size = f.stat().st_size
                f.seek(max(0, size - max_bytes))
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def size(self, rel: str) -> int | None:
        """A file's size in bytes, or None if it does not exist."""
        try:
            return self.sftp.stat(self.path(rel)).st_size or 0
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def read_from(self, rel: str, offset: int, *, max_bytes: int) -> tuple[bytes, int] | None:
        """What a growing file holds past `offset` (at most `max_bytes`), with the file's size
        now; None if it does not exist. A file shorter than `offset` was replaced: read it
        from its start."""
        try:
            with self.sftp.open(self.path(rel), "r") as f:
                size = f.stat().st_size or 0
                start = offset if offset <= size else 0
                f.seek(start)
                data = f.read(min(max_bytes, size - start)) if size > start else b""
                return data, start + len(data)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise

    def download(self, rel: str, local: Path) -> int:
        """Copy a file of the share to `local` (a temporary beside it, then a rename, so a
        broken transfer never leaves half a file under the final name); return its size."""
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self.sftp.get(self.path(rel), str(tmp))
            os.replace(tmp, local)
        except FileNotFoundError as e:
            raise ClusterError(f"{rel} is not on the share (it should have just been written there)") from e
        finally:
            tmp.unlink(missing_ok=True)
        return local.stat().st_size

    def remove(self, rel: str) -> None:
        """Delete a file of the share; one that is already gone counts as deleted."""
        try:
            self.sftp.remove(self.path(rel))
        except FileNotFoundError:
            pass


def ship_files(local: Path) -> list[Path]:
    """The files `--ship LOCAL` copies: LOCAL itself, or every file under it but __pycache__."""
    if not local.exists():
        raise ClusterError(f"--ship {local}: no such file or directory")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()
                                                   and "__pycache__" not in p.parts)
    if len(files) > MAX_SHIP_FILES:
        raise ClusterError(
            f"--ship {local}: {len(files)} files; ship code only and put data on the share with `fab push`"
        )
    return files
