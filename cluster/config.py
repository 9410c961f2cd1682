"""cluster.toml, parsed into frozen dataclasses with errors that name the field and the fix."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError

DEFAULT_CONFIG = "cluster.toml"
CONFIG_ENV = "SPOTFAN_CONFIG"
JAIL_SHARE = "/share"  # where the share sits inside the head's chroot jail
MAX_USER_NAME = 32  # useradd's limit on Linux


@dataclass(frozen=True)
class HeadConfig:
    """The persistent machine that holds the shared directory."""

    address: str  # where workers (and the laptop) reach the head's sshd
    port: int  # the head's SSH port
    user: str  # the jailed, SFTP-only user on the head that both the laptop and the VMs log in as
    share: Path  # the shared directory on the head (the run root)
    host_keys: Path | None  # known_hosts lines for the head; the lab fills this in itself
    jail: str  # the user's sshd ChrootDirectory on the head; the share appears at JAIL/share; "" = none

    @property
    def sftp_share(self) -> str:
        """The share's path as SFTP clients (the laptop, the VMs' SSHFS) see it on the head."""
        return JAIL_SHARE if self.jail else str(self.share)


@dataclass(frozen=True)
class SSHConfig:
    """How the laptop reaches the VMs, and how the VMs reach the head."""

    user: str  # SSH user on the VMs
    key: Path  # laptop -> VMs private key (created if missing, mode 0600)
    worker_key: Path  # VMs -> head key, SFTP-only on the head (created if missing)
    known_hosts: Path  # per-cluster known_hosts, rebuilt from what the provider reports
    connect_timeout: float  # seconds for one TCP connect + SSH handshake
    boot_timeout: float  # seconds a new or restarted VM gets to answer SSH
    command_timeout: float  # seconds any one remote command may take
    kex_algorithms: str  # KexAlgorithms for the VMs' SSHFS link to the head; "" = OpenSSH default


@dataclass(frozen=True)
class LabConfig:
    """The lab provider: VMs that are namespaces on this machine."""

    state_dir: Path  # where the lab keeps its VMs' disks, pids and the head's files
    address_prefix: str  # VM N listens on f"{address_prefix}{N}:22", e.g. "127.0.1."
    max_run_hours: float  # a lab VM powers itself off after this long, like max_run_duration


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster, as described by cluster.toml."""

    path: Path  # the cluster.toml this came from
    name: str  # cluster name: VM names are f"{name}-w001"...
    provider: str  # key into cluster.provider.PROVIDERS
    workers: int  # number of worker VMs
    machine_type: str  # provider machine type (ignored by the lab)
    image: str  # boot image the VMs are created from (ignored by the lab)
    zones: tuple[str, ...]  # zones to try in order (ignored by the lab)
    spot: bool  # spot/preemptible VMs
    idle_timeout: float  # seconds a worker with nothing to do waits before stopping its VM
    workers_per_vm: int  # default `tasks run --workers` on each VM
    python: str  # interpreter on the VMs that has spotfan installed
    python_path: tuple[str, ...]  # extra PYTHONPATH entries on the VMs
    mount_point: str  # where each VM mounts the head's share
    head: HeadConfig
    ssh: SSHConfig
    lab: LabConfig

    def vm_names(self, count: int | None = None) -> list[str]:
        """The names of the first `count` (default: `workers`) VMs of this cluster."""
        n = self.workers if count is None else count
        return [f"{self.name}-w{i:03d}" for i in range(1, n + 1)]


def config_path(explicit: str | None = None) -> Path:
    """The config file to use: the explicit one, else $SPOTFAN_CONFIG, else ./cluster.toml."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and check a cluster.toml."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(
            f"{path}: no such config file: copy cluster.toml from the spotfan repository, "
            f"or point {CONFIG_ENV} at yours"
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse(raw, path=Path(os.path.abspath(path)))


def parse(raw: dict[str, Any], *, path: Path) -> ClusterConfig:
    """Build a ClusterConfig from parsed TOML; relative paths are relative to `path`'s folder."""
    base = path.parent
    r = _Reader(raw, path)
    provider = r.str("cluster.provider", "lab")
    lab_provider = provider == "lab"

    def local(field: str, default: str | None) -> Path:
        return _resolve(base, r.str(field, default))

    def remote(field: str, default: str) -> str:
        # A path on the VMs. Lab VMs share this machine's filesystem, so a relative path
        # means the same as for a local one; elsewhere it must be absolute.
        value = r.str(field, default)
        if lab_provider:
            return str(_resolve(base, value))
        if not value.startswith("/"):
            raise ConfigError(f"{path}: {field} = {value!r} must be an absolute path on the VMs")
        return value

    name = r.str("cluster.name", None)
    if not name.replace("-", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ConfigError(
            f"{path}: cluster.name = {name!r}: use lowercase letters, digits and '-', "
            "starting with a letter (it becomes part of every VM name)"
        )
    python = r.str("cluster.python", "python3")
    if lab_provider and "/" in python:
        python = str(_resolve(base, python))
    head_keys = raw.get("head", {}).get("host_keys")
    prefix = r.str("lab.address_prefix", "127.0.1.")
    if lab_provider and (not prefix.startswith("127.") or not prefix.endswith(".") or prefix.count(".") != 3):
        raise ConfigError(
            f"{path}: lab.address_prefix = {prefix!r}: lab VMs live on loopback only; "
            "use three octets of 127.0.0.0/8 and a trailing dot, e.g. \"127.0.1.\""
        )
    head = HeadConfig(
        address=r.str("head.address", None),
        port=r.int("head.port", 22, minimum=1, maximum=65535),
        user=r.str("head.user", f"spotfan-{name}"),
        share=local("head.share", None),
        host_keys=_resolve(base, head_keys) if head_keys else None,
        jail=r.str("head.jail", f"/srv/spotfan/{name}"),
    )
    _check_head(head, path=path, lab_provider=lab_provider)
    key = local("ssh.key", f".spotfan-keys/{name}/laptop")
    worker_key = local("ssh.worker_key", f".spotfan-keys/{name}/worker")
    state_dir = local("lab.state_dir", f".lab/{name}")
    secrets = {"ssh.key": key, "ssh.worker_key": worker_key}
    if lab_provider:  # the lab's state dir holds the VMs' disks, so their copies of the worker key
        secrets["lab.state_dir"] = state_dir
    for field, secret in secrets.items():
        if _inside(secret, head.share):
            raise ConfigError(
                f"{path}: {field} = {str(secret)!r} is inside head.share ({head.share}): private "
                "keys must never be in the shared directory, which every VM can read; move it out"
            )
    return ClusterConfig(
        path=path,
        name=name,
        provider=provider,
        workers=r.int("cluster.workers", 2, minimum=0, maximum=250),
        machine_type=r.str("cluster.machine_type", "e2-standard-4"),
        image=r.str("cluster.image", ""),
        zones=tuple(r.list("cluster.zones", [])),
        spot=r.bool("cluster.spot", True),
        idle_timeout=r.float("cluster.idle_timeout", 600.0, minimum=1.0),
        workers_per_vm=r.int("cluster.workers_per_vm", 1, minimum=1, maximum=1024),
        python=python,
        python_path=tuple(
            str(_resolve(base, p)) if lab_provider else p for p in r.list("cluster.python_path", [])
        ),
        mount_point=remote("cluster.mount_point", "/mnt/spotfan"),
        head=head,
        ssh=SSHConfig(
            user=r.str("ssh.user", "root"),
            key=key,
            worker_key=worker_key,
            known_hosts=local("ssh.known_hosts", f".spotfan-keys/{name}/known_hosts"),
            connect_timeout=r.float("ssh.connect_timeout", 10.0, minimum=0.1),
            boot_timeout=r.float("ssh.boot_timeout", 120.0, minimum=0.1),
            command_timeout=r.float("ssh.command_timeout", 120.0, minimum=0.1),
            kex_algorithms=r.str("ssh.kex_algorithms", ""),
        ),
        lab=LabConfig(
            state_dir=state_dir,
            address_prefix=prefix,
            max_run_hours=r.float("lab.max_run_hours", 24.0, minimum=0.01),
        ),
    )


def _check_head(head: HeadConfig, *, path: Path, lab_provider: bool) -> None:
    """The jailed head user and its chroot: names sshd and useradd accept, paths sshd accepts."""
    u = head.user
    if not re.fullmatch(rf"[a-z_][a-z0-9_-]{{0,{MAX_USER_NAME - 1}}}", u):
        raise ConfigError(
            f"{path}: head.user = {u!r}: use at most {MAX_USER_NAME} lowercase letters, digits, "
            "'-' and '_', starting with a letter (for a long cluster name, set head.user = \"spotfan-x\")"
        )
    if head.jail and (not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", head.jail) or ".." in head.jail.split("/")):
        raise ConfigError(
            f"{path}: head.jail = {head.jail!r} must be an absolute folder on the head of letters, "
            "digits and ._- (sshd's ChrootDirectory), e.g. \"/srv/spotfan/NAME\"; or \"\" for no jail"
        )
    if lab_provider and (not head.jail or u == "root"):
        raise ConfigError(
            f"{path}: the lab always jails the head's SFTP user: set head.jail to a folder such as "
            "\"/srv/spotfan/NAME\" and head.user to a user that is not root (default: spotfan-NAME)"
        )


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolve(base: Path, value: str) -> Path:
    # abspath, not resolve(): a venv's bin/python is a symlink that must stay one.
    return Path(os.path.abspath(base / Path(value).expanduser()))


class _Reader:
    """Typed access to "section.field" values, raising ConfigError that names the field."""

    _MISSING = object()

    def __init__(self, raw: dict[str, Any], path: Path) -> None:
        self._raw = raw
        self._path = path

    def _get(self, field: str, default: Any) -> Any:
        section, key = field.split(".")
        table = self._raw.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{self._path}: [{section}] must be a table")
        if key in table:
            return table[key]
        if default is None:
            raise ConfigError(f"{self._path}: {field} is required: add `{key} = ...` under [{section}]")
        return default

    def _fail(self, field: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{self._path}: {field} = {value!r} must be {want}")

    def str(self, field: str, default: str | None) -> str:
        value = self._get(field, default)
        if not isinstance(value, str) or (default is None and not value):
            raise self._fail(field, value, "a non-empty string")
        return value

    def bool(self, field: str, default: bool) -> bool:
        value = self._get(field, default)
        if not isinstance(value, bool):
            raise self._fail(field, value, "true or false")
        return value

    def int(self, field: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self._fail(field, value, f"a whole number from {minimum} to {maximum}")
        return value

    def float(self, field: str, default: float, *, minimum: float) -> float:
        value = self._get(field, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
            raise self._fail(field, value, f"a number of at least {minimum}")
        return float(value)

    def list(self, field: str, default: list[str]) -> list[str]:
        value = self._get(field, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(field, value, 'a list of strings, e.g. ["a", "b"]')
        return value
