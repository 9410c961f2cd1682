"""The lab's head: an sshd on this machine that serves the share over SFTP only, to one jailed user.

The sshd runs in its own mount and PID namespaces: the share is bind-mounted at
JAIL/share there only (no mount is visible to, or left behind on, the host), and
killing the sshd ends every session with it. A change of its settings alone is a
reload (SIGHUP: sshd re-executes itself, and every session stays).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from cluster import jail
from cluster.errors import ProvisionError
from cluster.procs import ProcRecord
from cluster.providers.lab import host, users
from cluster.ssh_keys import ensure_key_pair, host_pattern, known_hosts_lines, public_key

logger = logging.getLogger(__name__)

HEAD_LISTEN_TIMEOUT_S = 10.0
HEAD_UNSHARE = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]


class LabHead:
    """The head's sshd of one lab cluster, its files in `state_dir/head/`. Constructing it does no I/O."""

    def __init__(self, *, name: str, state_dir: Path) -> None:
        self.name = name
        self.dir = state_dir / "head"
        self.state_dir = state_dir

    def start(self, *, share: Path, address: str, port: int, authorized: Sequence[str],
              user: str, jail_dir: str, workers: int) -> None:
        """Start (or keep) the head's sshd, serving `share` only to the jailed `user` (see cluster.jail).

        `authorized` are that user's authorized_keys lines; `workers` sizes sshd for that
        many VMs connecting at once (jail.fleet_sshd_settings).
        """
        host.check_host()
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)  # sshd reads authorized_keys as the jailed user; nothing here is listable
        share.mkdir(parents=True, exist_ok=True)
        made = {"user": user, "jail": jail_dir}
        if host.read_json(d / "jail.json") not in (None, made):
            self.stop()  # head.user or head.jail changed: remove the old ones first
        host.write(d / "jail.json", json.dumps(made))  # what stop removes
        uid, gid = users.ensure_user(user, marker=self._user_marker())
        users.hand_over(share, uid, gid)
        users.ensure_dirs(Path(jail_dir))
        key = ensure_key_pair(d / "ssh_host_ed25519_key", comment=f"{self.name}-head")
        # sshd reads authorized_keys as the jailed user, so it lives beside the jail (root-owned,
        # searchable by all) rather than in the state dir, which may sit in a 0700 home.
        keys_file = users.keys_file(Path(jail_dir), user)
        users.ensure_keys_dir(keys_file.parent)
        host.write(keys_file, "".join(f"{line}\n" for line in authorized), mode=0o644)
        users.check_reachable(keys_file)
        config = (f"# lab head of {self.name}: {share} is bind-mounted at {jail_dir}/share\n"
                  + host.sshd_config(listen=f"{address}:{port}", host_key=key, authorized_keys=keys_file,
                                     only_user=user, fleet=jail.fleet_sshd_settings(workers))
                  + jail.match_block(user=user, jail=jail_dir))
        rec = host.read_proc(d / "sshd.json")
        proc = rec.process() if rec is not None else None
        old = (d / "sshd_config").read_text() if (d / "sshd_config").exists() else None
        if proc is not None and old == config:
            return  # sshd reads authorized_keys on every login, so new lines apply without a restart
        if proc is not None and old is not None and host.listen_line(old) == host.listen_line(config):
            logger.info("lab head: its settings changed; reloading it (sessions stay)")
            host.write(d / "sshd_config", config)
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + HEAD_LISTEN_TIMEOUT_S
            time.sleep(host.POLL_INTERVAL_S)  # it closes its socket, re-executes and listens again
            while not host.listening(address, port) and time.monotonic() < deadline:
                time.sleep(host.POLL_INTERVAL_S)
            return
        if proc is not None:
            logger.info("lab head: its settings changed; restarting it")
            host.kill(rec)
        host.write(d / "sshd_config", config)
        if host.listening(address, port):
            raise ProvisionError(
                f"lab head: {address}:{port} is taken by another process: stop it, or set "
                "head.port in cluster.toml to a free port"
            )
        self._spawn(share=share, jail_dir=jail_dir, address=address, port=port)

    def _spawn(self, *, share: Path, jail_dir: str, address: str, port: int) -> None:
        d = self.dir
        p = host.spawn(
            [*HEAD_UNSHARE, "--", "/bin/sh", "-c", 'mount --bind "$1" "$2" && exec "$3" -D -f "$4" -E "$5"',
             "lab-head", str(share), f"{jail_dir}/share", host.SSHD, str(d / "sshd_config"), str(d / "sshd.log")],
            log=d / "sshd.log")
        deadline = time.monotonic() + HEAD_LISTEN_TIMEOUT_S
        init = None
        while not host.listening(address, port):
            if init is None:
                init = host.first_child(p.pid)
                if init is not None:
                    # PID 1 of the head's namespaces: killing it ends every session too.
                    host.write_proc(d / "sshd.json", ProcRecord.of(init))
            if p.poll() is not None or time.monotonic() > deadline:
                raise ProvisionError(
                    f"lab head: sshd did not start on {address}:{port}: "
                    f"{host.tail(d / 'sshd.log')} (see {d / 'sshd.log'})"
                )
            time.sleep(host.POLL_INTERVAL_S)
        if init is None:
            init = host.first_child(p.pid)
            host.write_proc(d / "sshd.json", ProcRecord.of(init or p.pid))

    def stop(self) -> None:
        """Stop the head's sshd and every session with it; remove its jailed user and jail folders.

        The share and the head's host key stay, so a later `fab up` serves the same data
        under the same key.
        """
        host.kill(host.read_proc(self.dir / "sshd.json"))
        made = host.read_json(self.dir / "jail.json")
        if made is None:
            return
        users.remove_user(made["user"], marker=self._user_marker())
        users.keys_file(Path(made["jail"]), made["user"]).unlink(missing_ok=True)
        users.remove_dirs(Path(made["jail"]))
        (self.dir / "jail.json").unlink()

    def host_keys(self, address: str, port: int) -> list[str]:
        key = self.dir / "ssh_host_ed25519_key"
        if not key.exists():
            return []
        return known_hosts_lines(host_pattern(address, port), [public_key(key)])

    def _user_marker(self) -> str:
        """The GECOS comment of the head user this lab makes: only such a user is ever deleted."""
        return f"spotfan lab head {hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]}"
