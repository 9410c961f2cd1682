"""cluster.toml, parsed into frozen dataclasses with errors that name the field and the fix."""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import schema
from cluster.errors import ConfigError
from cluster.jail import JAIL_SHARE
from cluster.providers import PROVIDERS
from cluster.providers.base import TableContext
from tasks.errors import SpecError
from tasks.store.url import RootURL, parse_root

DEFAULT_CONFIG = "cluster.toml"
CONFIG_ENV = "SPOTFAN_CONFIG"
MAX_USER_NAME = 32  # useradd's limit on Linux
MAX_WORKERS = 250
IDLE_ACTIONS = ("stop", "delete")  # what an idle worker does to its own VM (the lab always powers off)
SHARE_KINDS = ("sshfs", "s3", "gcs")  # [share] kind: a head machine's folder over SSHFS, or a bucket
SCHEME_OF_KIND = {"s3": "s3", "gcs": "gs"}  # the URL scheme each object-store kind takes


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
class ShareConfig:
    """Where the cluster's run root (inputs, outputs, bookkeeping) lives: the [share] table."""

    kind: str  # "sshfs": the head's folder, mounted by every VM; "s3" | "gcs": a bucket, no head, no mount
    url: RootURL | None  # the bucket root (s3://BUCKET/PREFIX, gs://BUCKET/PREFIX); None for sshfs

    @property
    def headless(self) -> bool:
        """No head machine: the VMs and the laptop talk to the bucket directly."""
        return self.url is not None


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
    kex_algorithms: str  # KexAlgorithms of spotfan's OpenSSH clients to the head (SSHFS, a runner's session, fab push); "" = OpenSSH default


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster, as described by cluster.toml."""

    path: Path  # the cluster.toml this came from
    name: str  # cluster name: VM names are f"{name}-w001"...
    provider: str  # key into cluster.providers.PROVIDERS
    workers: int  # number of worker VMs
    machine_type: str  # provider machine type (ignored by the lab)
    image: str  # boot image the VMs are created from (ignored by the lab)
    zones: tuple[str, ...]  # zones to try in order (ignored by the lab)
    spot: bool  # spot/preemptible VMs
    idle_timeout: float  # seconds a VM with no key of its own running waits before stopping itself
    idle_action: str  # "stop" (its disk stays, billed) or "delete" (gone); the lab always powers off
    workers_per_vm: int  # default `tasks run --workers` on each VM (on a GPU VM: one per GPU group)
    python: str  # interpreter on the VMs that has spotfan installed
    python_path: tuple[str, ...]  # extra PYTHONPATH entries on the VMs
    mount_point: str  # where each VM mounts the head's share
    gpus_per_worker: int  # on a GPU VM: GPUs per worker process (its CUDA_VISIBLE_DEVICES group)
    nvidia_smi: str  # the driver's tool on the image (a name on PATH or a path): the boot's GPU check, GPU metrics without NVML
    head: HeadConfig | None  # None on a headless cluster (share.kind "s3" or "gcs")
    ssh: SSHConfig
    settings: object  # the provider's own table, parsed by its registry entry (LabSettings, GceSettings, ...)
    share: ShareConfig = ShareConfig("sshfs", None)

    @property
    def run_root(self) -> str:
        """What the VMs' `tasks` commands get as --root: the mount point, or the bucket's URL."""
        return self.share.url.url if self.share.url is not None else self.mount_point

    def the_head(self) -> HeadConfig:
        """The [head] table; a ConfigError on a headless cluster, which has none."""
        if self.head is None:
            raise ConfigError(f"{self.path}: this cluster has no head: its share is the bucket "
                              f"{self.run_root} ([share] kind = {self.share.kind!r}); the `tasks` commands take "
                              f"it as their root (python -m tasks failures SPEC --root {self.run_root}), "
                              "and `fab push/pull` or `aws s3 cp`/`gcloud storage cp` copy files")
        return self.head

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


def _cluster_name(value: str) -> str | None:
    if not value.replace("-", "").isalnum() or not value[0].isalpha() or value != value.lower():
        return ("use lowercase letters, digits and '-', starting with a letter (it becomes part "
                "of every VM name)")
    return None


_KEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+-]*")


def _kex_list(value: str) -> str | None:
    """OpenSSH's KexAlgorithms syntax (a list, optionally +, - or ^ first); it reaches ssh's
    command lines and mount.sh's option list, so nothing else may be in it."""
    names = value[1:] if value[:1] in ("+", "-", "^") else value
    if value and not all(_KEX_NAME.fullmatch(n) for n in names.split(",")):
        return ('must be OpenSSH key exchange names separated by commas (`ssh -Q kex` lists this machine\'s), '
                'e.g. "curve25519-sha256"; or "" for OpenSSH\'s default')
    return None


# Every table and key cluster.toml may have: one line per key (cluster.schema). Each
# provider's own table ([lab], [gce], ...) comes from its registry entry, checked by the
# same reader whatever the provider (typos and types; its required keys only when chosen).
CLUSTER: dict[str, schema.Field] = {
    "name": schema.text(check=_cluster_name),
    "provider": schema.text("lab", choices=tuple(PROVIDERS)),
    "workers": schema.whole(2, 0, MAX_WORKERS),
    "machine_type": schema.text("e2-standard-4"),
    "image": schema.text(""),
    "zones": schema.strings(),
    "spot": schema.flag(True),
    "idle_timeout": schema.number(600.0, 1.0),
    "idle_action": schema.text("stop", choices=IDLE_ACTIONS),
    "workers_per_vm": schema.whole(1, 1, 1024),
    "python": schema.text("python3"),
    "python_path": schema.strings(),
    "mount_point": schema.text("/mnt/spotfan"),
    "gpus_per_worker": schema.whole(1, 1, 16),
    "nvidia_smi": schema.text("nvidia-smi"),
}
HEAD: dict[str, schema.Field] = {
    "address": schema.text(),
    "port": schema.whole(22, 1, 65535),
    "user": schema.text(None),  # default spotfan-NAME
    "share": schema.text(),
    "host_keys": schema.text(None),
    "jail": schema.text(None),  # default /srv/spotfan/NAME
}
SSH: dict[str, schema.Field] = {
    "user": schema.text("root"),
    "key": schema.text(None),  # defaults under .spotfan-keys/NAME/
    "worker_key": schema.text(None),
    "known_hosts": schema.text(None),
    "connect_timeout": schema.number(10.0, 0.1),
    "boot_timeout": schema.number(120.0, 0.1),
    "command_timeout": schema.number(120.0, 0.1),
    "kex_algorithms": schema.text("", check=_kex_list),
}
SHARE: dict[str, schema.Field] = {
    "kind": schema.text("sshfs", choices=SHARE_KINDS),
    "url": schema.text(""),  # s3://BUCKET/PREFIX or gs://BUCKET/PREFIX, for kind "s3" | "gcs"
}
TABLES: dict[str, dict[str, schema.Field]] = {
    "cluster": CLUSTER, "share": SHARE, "head": HEAD, "ssh": SSH,
    **{spec.table: dict(spec.fields) for spec in PROVIDERS.values()},
}


def parse(raw: dict[str, Any], *, path: Path) -> ClusterConfig:
    """Build a ClusterConfig from parsed TOML; relative paths are relative to `path`'s folder.

    Every problem is reported at once, in file order, the provider's first: an unknown
    provider makes every provider-specific message beside the point.
    """
    table = raw.get("cluster")
    chosen = PROVIDERS.get(str(table.get("provider", "lab") if isinstance(table, dict) else "lab").lower())
    # A provider's table is read by the provider (its required keys may come from [cluster]).
    raw_share = raw.get("share")
    # Any kind but sshfs, or a url, means a bucket: no "[head] is required" beside its own problem.
    headless = isinstance(raw_share, dict) and (str(raw_share.get("kind", "sshfs")).lower() != "sshfs"
                                                or "url" in raw_share)
    # A provider's table is read by the provider (its required keys may come from [cluster]);
    # [head] is required only for a share on a head.
    found = schema.problems(raw, TABLES, required={"head": not headless,
                                                   **{spec.table: False for spec in PROVIDERS.values()}})
    found.sort(key=lambda p: (p.table, p.key) != ("cluster", "provider"))  # stable: file order otherwise
    if not any(p.table in ("share", "head") for p in found):
        found += _check_share(raw)
    if found:
        raise schema.error(path, found)
    assert chosen is not None  # an unknown provider is a problem above
    t = {name: schema.values(raw.get(name, {}), fields) for name, fields in TABLES.items()}
    c, h, s = t["cluster"], t["head"], t["ssh"]
    kind = t["share"]["kind"].lower()
    share = ShareConfig(kind, parse_root(t["share"]["url"]) if kind in SCHEME_OF_KIND else None)
    base = path.parent
    local = chosen.local_vms
    name = c["name"]
    problems: list[schema.Problem] = []

    def here(value: str) -> Path:
        return _resolve(base, value)

    def remote(table: str, key: str, value: str) -> str:
        # A path on the VMs. VMs on this machine share its filesystem, so a relative path
        # means the same as for a local one; elsewhere it must be absolute.
        if local:
            return str(_resolve(base, value))
        if not value.startswith("/"):
            problems.append(schema.Problem(table, key, f"= {value!r} must be an absolute path on the VMs"))
        return value

    python = c["python"]
    if local and "/" in python:
        python = str(_resolve(base, python))
    mount_point = remote("cluster", "mount_point", c["mount_point"])
    python_path = tuple(str(_resolve(base, p)) if local else p for p in c["python_path"])
    head = None if share.headless else HeadConfig(
        address=h["address"],
        port=h["port"],
        user=h["user"] if h["user"] is not None else f"spotfan-{name}",
        share=here(h["share"]),
        host_keys=_resolve(base, h["host_keys"]) if h["host_keys"] else None,
        jail=h["jail"] if h["jail"] is not None else f"/srv/spotfan/{name}",
    )
    if head is not None:
        problems += _check_head(head)
    key = here(s["key"] or f".spotfan-keys/{name}/laptop")
    worker_key = here(s["worker_key"] or f".spotfan-keys/{name}/worker")
    for field, secret in (("key", key), ("worker_key", worker_key)):
        if head is not None and _inside(secret, head.share):
            problems.append(schema.Problem(
                "ssh", field, f"= {str(secret)!r} is inside [head] share ({head.share}): private keys "
                "must never be in the shared directory, which every VM can read; move it out"))
    settings, more = chosen.parse(raw.get(chosen.table, {}), TableContext(
        path=path, cluster=c, ssh=s, head=head, share=share, resolve=here))
    problems += more
    if problems:
        raise schema.error(path, problems)
    return ClusterConfig(
        path=path,
        name=name,
        provider=chosen.name,
        workers=c["workers"],
        machine_type=c["machine_type"],
        image=c["image"],
        zones=tuple(c["zones"]),
        spot=c["spot"],
        idle_timeout=float(c["idle_timeout"]),
        idle_action=c["idle_action"].lower(),
        workers_per_vm=c["workers_per_vm"],
        python=python,
        python_path=python_path,
        mount_point=mount_point,
        gpus_per_worker=c["gpus_per_worker"],
        nvidia_smi=str(_resolve(base, c["nvidia_smi"])) if local and "/" in c["nvidia_smi"] else c["nvidia_smi"],
        head=head,
        ssh=SSHConfig(
            user=s["user"],
            key=key,
            worker_key=worker_key,
            known_hosts=here(s["known_hosts"] or f".spotfan-keys/{name}/known_hosts"),
            connect_timeout=float(s["connect_timeout"]),
            boot_timeout=float(s["boot_timeout"]),
            command_timeout=float(s["command_timeout"]),
            kex_algorithms=s["kex_algorithms"],
        ),
        settings=settings,
        share=share,
    )


def _check_share(raw: dict[str, Any]) -> list[schema.Problem]:
    """[share]: a bucket root that parse_root accepts, of the kind's store, and no [head] beside it;
    a share on a head takes no url. Checked before anything is created."""
    table = raw.get("share") or {}
    kind = str(table.get("kind", "sshfs")).lower()
    url = table.get("url", "")
    if kind not in SCHEME_OF_KIND:
        if url:
            return [schema.Problem("share", "url", f"= {url!r}: a url is for kind = \"s3\" or \"gcs\" (a bucket); "
                                   "kind = \"sshfs\" (the default) shares [head] share: set kind, or remove url")]
        return []
    example = f'{SCHEME_OF_KIND[kind]}://BUCKET/PREFIX'
    if not url:
        return [schema.Problem("share", "url", f'is required with kind = "{kind}": add `url = "{example}"`')]
    try:
        root = parse_root(url)
    except SpecError as e:
        why = str(e).removeprefix(f"root {url!r}").removeprefix(":").strip()
        return [schema.Problem("share", "url", f"= {url!r}: {why}")]
    if root.scheme != SCHEME_OF_KIND[kind]:
        other = next(k for k, v in SCHEME_OF_KIND.items() if v == root.scheme)
        return [schema.Problem("share", "url", f'= {url!r} is a {root.scheme}:// URL, but kind = "{kind}": '
                               f'write {example}, or set kind = "{other}"')]
    if "head" in raw:
        return [schema.Problem("head", None, f'is for a share on a head machine (kind = "sshfs"); with [share] '
                               f'kind = "{kind}" the VMs use the bucket and there is no head: remove [head]')]
    return []


def _check_head(head: HeadConfig) -> list[schema.Problem]:
    """The jailed head user and its chroot: names sshd and useradd accept, paths sshd accepts."""
    found = []
    u = head.user
    if not re.fullmatch(rf"[a-z_][a-z0-9_-]{{0,{MAX_USER_NAME - 1}}}", u):
        found.append(schema.Problem("head", "user", (
            f"= {u!r}: use at most {MAX_USER_NAME} lowercase letters, digits, '-' and '_', starting "
            'with a letter (for a long cluster name, set user = "spotfan-x")')))
    if head.jail and (not re.fullmatch(r"(/[A-Za-z0-9._-]+)+", head.jail) or ".." in head.jail.split("/")):
        found.append(schema.Problem("head", "jail", (
            f"= {head.jail!r} must be an absolute folder on the head of letters, digits and ._- "
            '(sshd\'s ChrootDirectory), e.g. "/srv/spotfan/NAME"; or "" for no jail')))
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _resolve(base: Path, value: str) -> Path:
    # abspath, not resolve(): a venv's bin/python is a symlink that must stay one.
    return Path(os.path.abspath(base / Path(value).expanduser()))
