"""The bytes of a `fab push` through OpenSSH's `sftp` client: several `sftp -b` processes, each a list of puts.

paramiko encrypts and frames every packet in Python on one thread per connection; OpenSSH's
client does it in C with AES-GCM and keeps 64 requests in flight. cluster.transfer decides
what to copy (skip, compare, part names, resume, the report); this module only runs the
copies it hands over, each `put -p LOCAL PART` (or `reput -p` to continue a part file) then
`rename PART FINAL` (posix-rename on OpenSSH: an atomic replace), or, inside a staged folder
that is renamed into place whole afterwards, `put -p` straight to the name; and it reports
each file as the next line starts. Its caller checks at the end what arrived. A failed put
stops its batch (sftp -b's rule for a line without `-`), so the rename after it never runs: a
write the head refused (a full disk) leaves no partial file at a final path; the rest of that
batch is reported not copied, and `current` names the put it stopped in. A failed rename does
not stop the batch (`-`). Logins trust only the cluster's known_hosts and key: no
~/.ssh/config, no agent, no other host keys.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cluster.procs import stop_group
from cluster.share import Login
from tasks.deathsig import die_with_parent

logger = logging.getLogger(__name__)

BUFFER_BYTES = 248 * 1024  # one write request (sftp -B): sftp-server refuses messages over 256 KiB
REQUESTS = 64  # requests in flight per process (sftp -R)
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr"
ALIVE_INTERVAL_S = 15  # with ALIVE_COUNT: a head silent for a minute fails the batch (IO_TIMEOUT_S)
ALIVE_COUNT = 4
STOP_S = 10.0  # a stopped batch gets this long after SIGTERM before SIGKILL
ERR_LINES = 50  # lines of a batch's stderr kept for the messages
PER_FILE_BYTES = 64 * 1024  # a file's fixed cost (round trips) in bytes, when batches are balanced


@dataclass(frozen=True)
class Put:
    """One file for a batch: copied to its part file, then renamed into place."""

    key: str  # the caller's name for it
    local: Path  # absolute
    part: str  # absolute path on the head; == final for a file of a staged folder
    final: str
    sends: int  # bytes this copy sends (all of them, or what a resumed part lacks)
    resume: bool  # continue the part file (`reput`): it holds the first bytes already


def available() -> bool:
    return shutil.which("sftp") is not None


def fits(*paths: str) -> bool:
    """Whether these paths can go on one batch line (a line break cannot be quoted there)."""
    return not any("\n" in p or "\r" in p for p in paths)


def quote(path: str) -> str:
    """A path as one batch-file argument: in double quotes (also no glob), `\\` and `"` escaped."""
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script(puts: Sequence[Put]) -> list[tuple[str, Put | None]]:
    """The batch's lines, each with the put whose bytes are all sent once the next line starts.

    A put to a part file is renamed into place after it. A put straight to its final name
    (part == final: a file of a staged folder, moved into place as a whole) goes from the
    folders `lcd` and `cd` chose, by name: no stat of the destination, no rename, two round
    trips fewer per file. `lcd`/`cd` lines have no `-`: if one fails the batch stops rather
    than put a file elsewhere; nor have puts: the rename after a failed one must not run.
    """
    out: list[tuple[str, Put | None]] = []
    here_l = here_r = None
    for p in puts:
        final = PurePosixPath(p.final)
        if p.part == p.final and p.local.name == final.name and not p.resume:
            if str(p.local.parent) != here_l:
                here_l = str(p.local.parent)
                out.append((f"lcd {quote(here_l)}", None))
            if str(final.parent) != here_r:
                here_r = str(final.parent)
                out.append((f"cd {quote(here_r)}", None))
            out.append((f"put -p {quote('./' + p.local.name)}", p))
        else:
            out.append((f"{'reput' if p.resume else 'put'} -p {quote(str(p.local))} {quote(p.part)}", p))
            out.append((f"-rename {quote(p.part)} {quote(p.final)}", None))
    return out


def options(login: Login) -> list[str]:
    """`-o` options of an OpenSSH client that logs in as `login` only: its key, the cluster's
    known_hosts, no config file's or agent's say, AES-GCM first; the cluster's KexAlgorithms if set."""
    opts = {
        "BatchMode": "yes", "StrictHostKeyChecking": "yes", "UserKnownHostsFile": str(login.known_hosts),
        "GlobalKnownHostsFile": "/dev/null", "IdentitiesOnly": "yes", "IdentityAgent": "none",
        "ForwardAgent": "no", "ControlMaster": "no", "ControlPath": "none", "ProxyCommand": "none",
        "UpdateHostKeys": "no", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
        "ConnectTimeout": str(max(1, round(login.connect_timeout))), "Ciphers": CIPHERS, "Compression": "no",
        "ServerAliveInterval": str(ALIVE_INTERVAL_S), "ServerAliveCountMax": str(ALIVE_COUNT),
        "LogLevel": "INFO",  # why a login failed ("Unable to negotiate ..."), and nothing on success
    }
    if login.kex_algorithms:
        opts["KexAlgorithms"] = login.kex_algorithms
    return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]


def kex_hint(login: Login, said: str) -> str:
    """What to do when OpenSSH found no key exchange method it shares with the head."""
    if "no matching key exchange method" not in said:
        return ""
    if login.kex_algorithms:
        return (f" (cluster.toml [ssh] kex_algorithms = {login.kex_algorithms!r} names none the head offers: "
                "name one of its offer, or remove the line for OpenSSH's default)")
    return " (this machine's OpenSSH and the head's share no key exchange method: set [ssh] kex_algorithms)"


def argv(login: Login, batch: Path, *, bwlimit: float) -> list[str]:
    """The sftp command line: this login only, `batch` as its commands (`-`: stdin), `bwlimit` bytes/s (0: none)."""
    cmd = ["sftp", "-F", "/dev/null", "-b", str(batch), "-B", str(BUFFER_BYTES), "-R", str(REQUESTS),
           "-P", str(login.port), "-i", str(login.key)]
    if bwlimit:
        cmd += ["-l", str(max(1, round(bwlimit * 8 / 1000)))]  # Kbit/s
    return [*cmd, *options(login), "--", f"{login.user}@{login.address}"]


def _feed(stdin: BinaryIO, text: bytes) -> None:
    """Write a batch's commands and close (sftp's end of input); a process that ended reads no more."""
    try:
        stdin.write(text)
        stdin.close()
    except OSError:
        pass


def split(puts: Sequence[Put], n: int) -> list[list[Put]]:
    """`n` batches of about equal cost, dealt biggest files first (they set the pace); each in
    folder order (fewer `cd`s)."""
    bins: list[tuple[int, list[Put]]] = [(0, []) for _ in range(max(1, min(n, len(puts))))]
    for p in sorted(puts, key=lambda p: -p.sends):
        i = min(range(len(bins)), key=lambda i: bins[i][0])
        cost, got = bins[i]
        bins[i] = (cost + p.sends + PER_FILE_BYTES, [*got, p])
    return [sorted(got, key=lambda p: (str(PurePosixPath(p.final).parent), -p.sends)) for _, got in bins if got]


class Batch:
    """One `sftp -b -` process over its puts, in a session of its own (stopped by process group).
    `start` logs it in (while the caller lists and compares: the login's round trips overlap),
    `run` hands it the puts; `close` ends one that was never given any."""

    def __init__(self, login: Login, *, bwlimit: float) -> None:
        self.login, self.bwlimit = login, bwlimit
        self.puts: list[Put] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.errors: deque[str] = deque(maxlen=ERR_LINES)
        self.sent: set[Put] = set()  # puts whose command ended (its success is `ok`'s to judge)
        self.current: Put | None = None  # the put of the line sftp started last (where a failed batch stopped)

    def start(self) -> None:
        """Start the process (it logs in, then waits for its commands on stdin)."""
        with self._lock:
            if self._proc is not None or self._stopped:
                return
            self._proc = subprocess.Popen(
                argv(self.login, Path("-"), bwlimit=self.bwlimit), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # stopped by us, by process group, not by the terminal
                preexec_fn=functools.partial(die_with_parent, os.getpid()))  # nor outlives a killed push

    def run(self, puts: Sequence[Put], on_sent: Callable[[Put], None]) -> int:
        """Copy the puts (blocks); `on_sent(put)` as each one's put command ends (the next line
        starts). The exit code."""
        self.puts = list(puts)
        lines = script(self.puts)
        self.start()
        with self._lock:
            if self._stopped:
                return -1
            proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        err = threading.Thread(target=self._read_errors, args=(proc.stderr,), daemon=True)
        err.start()
        text = "".join(f"{ln}\n" for ln, _ in lines).encode("utf-8", errors="surrogateescape")
        feed = threading.Thread(target=_feed, args=(proc.stdin, text), daemon=True)  # sftp reads as it goes
        feed.start()
        echoed = 0  # sftp echoes each line of the batch as it starts it
        for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace"):
            if line.startswith("sftp> ") and echoed < len(lines):
                if echoed and (sent := lines[echoed - 1][1]) is not None:
                    self.sent.add(sent)
                    on_sent(sent)
                self.current = lines[echoed][1]
                echoed += 1
        rc = proc.wait()
        if rc == 0 and echoed == len(lines) and (sent := lines[-1][1]) is not None:
            self.sent.add(sent)
            on_sent(sent)
        err.join()
        feed.join()
        if rc != 0:
            logger.info("sftp batch of %d file(s) exited %d: %s", len(self.puts), rc, " | ".join(self.errors))
        return rc

    def close(self) -> None:
        """End a process that was started and not given puts (stdin closed: sftp ends), else stop it."""
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=STOP_S)
        except (OSError, subprocess.TimeoutExpired):
            self.stop()

    def _read_errors(self, stream) -> None:  # type: ignore[no-untyped-def]
        for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
            self.errors.append(line.rstrip("\n"))

    def stop(self) -> None:
        """End the process and its ssh by process group: SIGTERM, then SIGKILL."""
        with self._lock:
            self._stopped = True
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        stop_group(proc, wait_s=STOP_S)

    def ok(self, put: Put) -> bool:
        """Whether sftp ran this put's commands and said nothing about it (the caller still
        checks the file is at its final path, whole)."""
        return put in self.sent and not any(put.part in e or put.final in e or str(put.local) in e
                                             for e in self.errors)

    def why(self, put: Put) -> str:
        """What sftp said about this file, else the end of what it said."""
        mine = [e for e in self.errors if put.part in e or str(put.local) in e]
        return " | ".join(mine[-2:] or list(self.errors)[-2:]) or "sftp ended before copying it"
