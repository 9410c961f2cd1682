"""SSH access to the VMs and the head (Fabric, paramiko): verified host keys, bounded retries, fan-outs.

Every fan-out runs to the end on every host and returns `{host: result}`; if any host
failed it raises one `GroupError` whose `results` hold each host's result or exception.
Host keys come only from the cluster's own known_hosts file: a host that is missing from
it, or that presents another key, is refused (never trusted on first use). Nothing else
comes from the laptop either: no ~/.ssh/config or /etc/ssh/ssh_config (Fabric reads both
by default, and a `Host *` block there could add a ProxyCommand, a jump host, agent
forwarding or another key), no Fabric config files, no SSH agent; only cluster.toml's
user, port and key. paramiko's and invoke's exceptions are turned into the cluster's
(SSHError, HostKeyError) here and nowhere else.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko
from fabric import Config, Connection
from invoke.exceptions import CommandTimedOut

from cluster.errors import HostKeyError, SSHError
from cluster.fanout import all_ok, fan_out
from cluster.ssh_keys import host_pattern

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 3  # for a host that should be up: refused or reset connections are retried
RETRY_BACKOFF_S = 0.5  # doubled after each failed attempt
READY_POLL_S = 0.05  # while waiting for a booting VM's sshd (a refused connect is cheap)
MAX_PARALLEL = 32  # connections opened at once
CHUNK_POLL_S = 0.01  # while feeding a command its stdin and reading what it prints
EOF_AFTER_EXIT_S = 2.0  # the output still owed after the exit status, unless a background process holds it

T = TypeVar("T")


@dataclass(frozen=True)
class Host:
    """Where one VM's sshd is."""

    name: str  # VM name, used in every message and as the key of every result
    address: str
    port: int


@dataclass(frozen=True)
class Output:
    """What one command printed on one host."""

    host: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class RemoteCommandError(SSHError):
    """A command ran but exited non-zero; `output` has what it printed."""

    def __init__(self, message: str, output: Output) -> None:
        super().__init__(message)
        self.output = output


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    """Refuse a host that is not in the cluster's known_hosts, saying which key it showed."""

    def __init__(self, host: Host, known_hosts: Path) -> None:
        self.host = host
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(
            f"{self.host.name} ({hostname}) is not in {self.known_hosts}; it presented "
            f"{key.get_name()} {key.fingerprint}. Run `fab up` to rebuild known_hosts from "
            "what the provider reports; spotfan never trusts a host key on first use."
        )


class Remote:
    """SSH access to a cluster's VMs as one user with one key. Constructing it does no I/O.

    `kept` connections (one per host, for commands repeated while a command runs, such as
    the status a wait asks for at every tick) stay open until `close`.
    """

    def __init__(self, *, user: str, key: Path, known_hosts: Path, connect_timeout: float,
                 command_timeout: float) -> None:
        self.user = user
        self.key = key
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._kept: dict[Host, Connection] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close every kept connection."""
        with self._lock:
            kept, self._kept = self._kept, {}
        for conn in kept.values():
            conn.close()

    def kept(self, host: Host) -> Connection:
        """An open connection to `host`, opened (one attempt) on first use and kept until `close`."""
        with self._lock:
            conn = self._kept.get(host)
        if conn is not None and conn.is_connected:
            return conn
        conn = self.open(host, attempts=1)
        with self._lock:
            self._kept[host] = conn
        return conn

    def forget(self, host: Host) -> None:
        """Close a kept connection that failed, so the next `kept` opens a new one."""
        with self._lock:
            conn = self._kept.pop(host, None)
        if conn is not None:
            conn.close()

    # -- one host -----------------------------------------------------------------------

    def connection(self, host: Host, *, user: str | None = None) -> Connection:
        """An unopened Fabric connection that accepts only the host key in our known_hosts."""
        conn = Connection(
            host.address, user=user or self.user, port=host.port, config=_cluster_only_config(),
            gateway=False, forward_agent=False,
            connect_timeout=max(1, round(self.connect_timeout)),
            connect_kwargs={
                "key_filename": [str(self.key)], "look_for_keys": False, "allow_agent": False,
                "banner_timeout": self.connect_timeout, "auth_timeout": self.connect_timeout,
            },
        )
        # Fabric's default policy trusts unknown hosts; replace it, and load only this cluster's hosts.
        conn.client.set_missing_host_key_policy(_RefuseUnknown(host, self.known_hosts))
        if self.known_hosts.exists():
            conn.client.load_host_keys(str(self.known_hosts))
        return conn

    def open(self, host: Host, *, attempts: int = CONNECT_ATTEMPTS, user: str | None = None,
             refused: str | None = None) -> Connection:
        """Open a connection, retrying refused/reset/timed-out ones a bounded number of times.

        `refused`: the message when the host refuses the key (default: is the VM provisioned).
        """
        delay = RETRY_BACKOFF_S
        last: BaseException | None = None
        for attempt in range(1, attempts + 1):
            conn = self.connection(host, user=user)
            try:
                conn.open()
                return conn
            except paramiko.BadHostKeyException as e:
                conn.close()
                raise HostKeyError(
                    f"host key of {host.name} ({host_pattern(host.address, host.port)}) changed: "
                    f"{self.known_hosts} has {e.expected_key.get_name()} {e.expected_key.fingerprint}, "
                    f"the host presented {e.key.get_name()} {e.key.fingerprint}. If the VM was "
                    "recreated, run `fab up` to refresh known_hosts from the provider; otherwise "
                    "someone may be intercepting the connection: do not proceed."
                ) from e
            except HostKeyError:
                conn.close()
                raise
            except paramiko.AuthenticationException as e:
                conn.close()
                raise SSHError(refused or (
                    f"{host.name}: {user or self.user}@{host.address} refused the key {self.key}: "
                    "is the VM provisioned with this cluster's key?")) from e
            except (OSError, EOFError, paramiko.SSHException) as e:
                conn.close()
                last = e
                if attempt < attempts:
                    time.sleep(delay)
                    delay *= 2
        raise SSHError(
            f"{host.name} ({host.address}:{host.port}) did not answer SSH "
            f"({attempts} attempts, {self.connect_timeout:g}s each): {_describe(last)}"
        ) from last

    def sftp(self, conn: Connection, host: Host) -> paramiko.SFTPClient:
        """An SFTP session on an open connection."""
        try:
            return conn.sftp()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(f"{host.name} {host.address}:{host.port}: no SFTP: {e}") from e

    def wait_ready(self, host: Host, *, timeout: float) -> Connection:
        """Open a connection to a VM that may still be booting, polling until `timeout`."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        for _ in range(int(timeout / READY_POLL_S) + 1):
            try:
                return self.open(host, attempts=1)
            except HostKeyError:
                raise
            except SSHError as e:
                last = e.__cause__ or e
            if time.monotonic() + READY_POLL_S > deadline:
                break
            time.sleep(READY_POLL_S)
        raise SSHError(
            f"{host.name} ({host.address}:{host.port}) never answered SSH within {timeout:g}s: "
            f"{_describe(last)}. Check the VM's console log; `fab heal` retries it."
        ) from last

    def run_on(self, conn: Connection, host: Host, command: str, *, timeout: float | None = None,
               check: bool = True, stdin: bytes | None = None) -> Output:
        """Run one command on an open connection (feeding it `stdin`); non-zero exit raises if `check`."""
        limit = timeout or self.command_timeout
        try:
            if stdin is None:
                r = conn.run(command, hide=True, warn=True, timeout=limit, in_stream=False)
                out = Output(host=host.name, exit_code=r.exited, stdout=r.stdout, stderr=r.stderr)
            else:
                out = _run_with_input(conn, host, command, stdin, timeout=limit)
        except CommandTimedOut as e:
            raise SSHError(f"{host.name}: `{command}` took longer than {limit:g}s") from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SSHError(f"{host.name}: lost the connection while running `{command}`: {e}") from e
        if check and not out.ok:
            detail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-3:]
            raise RemoteCommandError(
                f"{host.name}: `{command}` exited {out.exit_code}: {' | '.join(detail)}", out
            )
        return out

    # -- many hosts ---------------------------------------------------------------------

    def each(self, hosts: Sequence[Host], fn: Callable[[Host], T], *, what: str) -> dict[str, T]:
        """Call `fn(host)` for every host in parallel; raise GroupError if any failed."""
        return all_ok(fan_out(hosts, fn, key=lambda h: h.name, max_parallel=MAX_PARALLEL), what=what)

    def run(self, hosts: Sequence[Host], command: str, *, timeout: float | None = None,
            check: bool = True) -> dict[str, Output]:
        """Run `command` on every host at once."""

        def one(host: Host) -> Output:
            with self.open(host) as conn:
                return self.run_on(conn, host, command, timeout=timeout, check=check)

        return self.each(hosts, one, what=f"`{command}`")


def _cluster_only_config() -> Config:
    """A Fabric config that reads no file: not the user's or the system's ssh_config (an
    explicit, empty SSHConfig stops Fabric from loading them) and not ~/.fabric.yaml or
    /etc/fabric.yaml (lazy), so every setting of a connection is the one spotfan passes."""
    return Config(ssh_config=paramiko.SSHConfig(), lazy=True,
                  overrides={"load_ssh_configs": False, "forward_agent": False, "gateway": None})


def _run_with_input(conn: Connection, host: Host, command: str, data: bytes, *, timeout: float) -> Output:
    """exec with bulk stdin on a raw channel (invoke's stdin pump is made for typing, not files)."""
    deadline = time.monotonic() + timeout
    chan = conn.client.get_transport().open_session(timeout=timeout)
    try:
        chan.settimeout(timeout)
        chan.exec_command(command)
        chan.sendall(data)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        exited: float | None = None
        for _ in range(int(timeout / CHUNK_POLL_S) + 1):
            while chan.recv_ready():
                out += chan.recv(65536)
            while chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            # sshd may send the exit status before the last of the output: done at the
            # channel's EOF, or a moment after the exit status if a background process of
            # the command still holds its stdout open.
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                if chan.eof_received:
                    break
                exited = exited or time.monotonic()
                if time.monotonic() - exited > EOF_AFTER_EXIT_S:
                    break
            if time.monotonic() > deadline:
                raise CommandTimedOut(None, timeout)  # type: ignore[arg-type]
            time.sleep(CHUNK_POLL_S)
        code = chan.recv_exit_status()
        while chan.recv_ready():
            out += chan.recv(65536)
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
    finally:
        chan.close()
    return Output(host=host.name, exit_code=code, stdout=out.decode(errors="replace"),
                  stderr=err.decode(errors="replace"))


def _describe(e: BaseException | None) -> str:
    if e is None:
        return "no attempt was made"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    text = str(e)
    if isinstance(e, paramiko.SSHException) and ("banner" in text or "No existing session" in text):
        return "the port accepts connections but no SSH server answers (hung sshd or not sshd)"
    return text or type(e).__name__
