"""What the providers that make the head as a VM of their own share: where the last `fab up` found it,
the boot-script lines that mount its data volume, and what such a head needs of [head].

Implementations (gce/head.py, aws/head.py) import this module and cluster.providers.base
only. The record of the head (its address and its host keys, read from the provider and
never from a first connection) lives next to the cluster's known_hosts, so that every
later command finds the head without cluster.toml being edited.
"""
from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from cluster import schema
from cluster.errors import ConfigError
from cluster.providers.base import HeadLocation, Instance, TableContext
from cluster.ssh_keys import write_known_hosts
from tasks.fs import atomic_write

DATA_MOUNT = "/mnt/disks/spotfan-data"  # where a head VM mounts its data disk; head.share lives below it
HEAD_ADDRESS = "head_vm.json"  # in the known_hosts folder: the head VM's address, from the last `fab up`
HEAD_KNOWN_HOSTS = "head_known_hosts"  # in the known_hosts folder: the head VM's lines, from the provider
MAX_SAVED_BYTES = 4096


def record_head(keys_dir: Path, vm: Instance, known_hosts_lines: Sequence[str]) -> HeadLocation:
    """Write where the head VM is and its host keys, for every later command; `fab up` refreshes them."""
    keys = keys_dir / HEAD_KNOWN_HOSTS
    write_known_hosts(keys, {"head": list(known_hosts_lines)})
    atomic_write(keys_dir / HEAD_ADDRESS, json.dumps({"name": vm.name, "address": vm.address, "zone": vm.zone}),
                 mode=0o600)
    return HeadLocation(name=vm.name, address=vm.address, zone=vm.zone, known_hosts=keys)


def saved_head(keys_dir: Path) -> HeadLocation | None:
    """The head VM the last `fab up` recorded; None before the first one."""
    saved, keys = keys_dir / HEAD_ADDRESS, keys_dir / HEAD_KNOWN_HOSTS
    if not saved.exists() or not keys.exists():
        return None
    try:
        with open(saved, "rb") as f:
            raw = json.loads(f.read(MAX_SAVED_BYTES))
        address, name = raw["address"], raw["name"]
        if not isinstance(address, str) or not address or not isinstance(name, str):
            raise ValueError("no address")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{saved} is damaged ({e}); run `fab up` to write it again") from e
    zone = raw.get("zone")
    return HeadLocation(name=name, address=address, zone=zone if isinstance(zone, str) else None, known_hosts=keys)


def format_and_mount(mount: str = DATA_MOUNT) -> str:
    """Shell lines, run as root with `$dev` the data device: format it only if it carries no
    signature at all (a new volume), then mount it at `mount` (fstab by UUID, `nofail`)."""
    mnt = shlex.quote(mount)
    return f"""# blkid -p exits 2 when the device carries no signature at all: only then is it new.
rc=0; blkid -p "$dev" >/dev/null 2>&1 || rc=$?
if [ "$rc" = 2 ]; then
  mkfs.ext4 -q -m 0 -E lazy_itable_init=0,lazy_journal_init=0,discard "$dev"
elif [ "$rc" != 0 ]; then
  echo "spotfan: blkid -p $dev failed ($rc); not formatting, not mounting" >&2; exit 1
fi
uuid=$(blkid -s UUID -o value "$dev")
install -d -m 755 {mnt}
grep -qs "^UUID=$uuid " /etc/fstab || echo "UUID=$uuid {mount} ext4 discard,defaults,nofail 0 2" >> /etc/fstab
mountpoint -q {mnt} || mount {mnt}
"""


def head_vm_problems(ctx: TableContext, *, table: str) -> list[schema.Problem]:
    """With `[<table>] create = true` the share lives on the head's data disk, in a jail."""
    if ctx.head is None:
        return [schema.Problem(table, None, (
            f'makes a head VM for a share on a head (kind = "sshfs"); with [share] kind = "{ctx.share.kind}" '
            f"the VMs use the bucket and there is no head: remove [{table}]"))]
    found = []
    share = str(ctx.head.share)
    if not share.startswith(DATA_MOUNT + "/"):
        found.append(schema.Problem("head", "share", (
            f"= {share!r}: with [{table}] create = true the share lives on the head VM's data disk, "
            f'mounted at {DATA_MOUNT}: set head.share = "{DATA_MOUNT}/share"')))
    if not ctx.head.jail or ctx.head.user == "root":
        found.append(schema.Problem("head", "jail" if not ctx.head.jail else "user", (
            f'= {ctx.head.jail if not ctx.head.jail else ctx.head.user!r}: a head VM always jails its SFTP '
            f'user: set head.jail (e.g. "/srv/spotfan/{ctx.cluster["name"]}", the share appears at '
            "JAIL/share) and a head.user that is not root")))
    return found
