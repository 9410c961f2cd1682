"""Where a VM's agent keeps the cluster's records (cluster.records): the mounted share, or the bucket.

    MountBooks   the head's share mounted at ROOT (SSHFS): files read and written in place;
                 `tasks run --root ROOT`, in ROOT (a task module shipped there is imported)
    BucketBooks  a headless cluster's bucket (ROOT is s3://BUCKET/PREFIX or gs://...): records
                 are objects (cluster.bucket_share); the logs the agent and its `tasks run`
                 append to are files on the VM's disk, uploaded whole every LOG_SYNC_S;
                 `tasks run --root URL`, in SPOTFAN_HOME/work

Both say whether the share is usable (`ok`, `state` as a heartbeat's `mount` field has it)
and are checked every few seconds by the agent (`check`): a dead mount is mounted again
with backoff (cluster.vm.mount), a bucket that stops answering is asked again.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from cluster import records
from cluster.bucket_share import AGENT_RETRIES, BucketShare
from cluster.errors import ClusterError
from cluster.vm.mount import MountWatch
from tasks.fs import atomic_write
from tasks.layout import is_object_url
from tasks.store.url import parse_root

logger = logging.getLogger("cluster.agent")

LOG_SYNC_S = 5.0  # a log on the VM's disk is uploaded this often while it grows
MAX_LOG_UPLOAD_BYTES = 4 << 20  # of a log, the last this many bytes are uploaded
BUCKET_POLL_S = 2.0  # runs/ is listed this often on a bucket (a LIST costs; a mount's listdir does not)
ERROR_TAIL_BYTES = 16 * 1024  # of a run's log, the end read for its runner's last error line


class MountBooks:
    """The share mounted at `root`."""

    step_interval = 0.0  # list runs/ at every turn of the agent's loop

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.watch = MountWatch(home)
        self.run_root = str(root)  # `tasks run --root`
        self.cwd = root  # where `tasks run` starts
        self.import_root = str(root)  # first on its PYTHONPATH: code shipped to the share
        self.local_root: Path | None = root  # the engine's logs, for the execution rate

    @property
    def ok(self) -> bool:
        return self.watch.ok

    @ok.setter
    def ok(self, value: bool) -> None:
        self.watch.ok = value

    @property
    def state(self) -> str:
        return self.watch.state

    @property
    def back_after(self) -> int:
        return self.watch.back_after

    def check(self, now: float) -> str:
        """`mount.sh check`, remounting with backoff: "back", "remounted" (look again) or ""."""
        return self.watch.check(now)

    def listdir(self, rel: str) -> list[str]:
        try:
            return sorted(os.listdir(self.root / rel))
        except FileNotFoundError:
            return []

    def read_text(self, rel: str) -> str | None:
        return records.read_bounded(self.root / rel, source=rel)

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def write_text(self, rel: str, text: str) -> None:
        atomic_write(self.root / rel, text, make_parents=True)

    def create_text(self, rel: str, text: str) -> bool:
        """Write `rel` unless it exists (the first agent's done record stays)."""
        if self.exists(rel):
            return False
        atomic_write(self.root / rel, text)
        return True

    def local(self, rel: str, *, make_parent: bool = True) -> Path:
        """The file the agent (or its `tasks run`) appends `rel` to: on the share itself
        (`make_parent` False: whoever writes it makes its folder)."""
        path = self.root / rel
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def sync(self, *, force: bool = False) -> None:
        """Nothing to upload: the share is the file system."""


class BucketBooks:
    """A headless cluster's bucket, as this VM's identity uses it."""

    step_interval = BUCKET_POLL_S

    def __init__(self, url: str, home: Path) -> None:
        self.share = BucketShare(parse_root(url), retries=AGENT_RETRIES)
        self.mirror = home / "share"  # the logs, on the VM's disk, before they are uploaded
        self.run_root = url
        self.cwd = home / "work"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.import_root = ""  # nothing is shipped to a bucket: code is on the image or python_path
        self.local_root: Path | None = None
        self.ok = False
        self.state = "unknown"
        self.back_after = 0
        self.failures = 0  # checks failed in a row
        self.synced: dict[str, tuple[Path, tuple[int, int] | None]] = {}  # rel -> (file, what was uploaded)
        self.last_sync = 0.0

    def check(self, now: float) -> str:
        """Ask the bucket (a HEAD or a one-name LIST): "back" when it answers again, else ""."""
        was = self.state
        try:
            self.share.check()
        except ClusterError as e:
            self.failures += 1
            if was != "dead":
                logger.warning("bucket not usable: %s", e)
            self.ok, self.state = False, "dead"
            return ""
        self.ok, self.state = True, "ok"
        if was == "dead":
            self.back_after, self.failures = self.failures, 0
            return "back"
        return ""

    def listdir(self, rel: str) -> list[str]:
        return self.share.listdir(rel)

    def read_text(self, rel: str) -> str | None:
        return self.share.read_text(rel)

    def exists(self, rel: str) -> bool:
        return self.share.exists(rel)

    def write_text(self, rel: str, text: str) -> None:
        self.share.write_text(rel, text)

    def create_text(self, rel: str, text: str) -> bool:
        return self.share.create_text(rel, text)

    def local(self, rel: str, *, make_parent: bool = True) -> Path:
        """The file on the VM's disk the agent appends `rel` to; uploaded as `rel` by `sync`."""
        path = self.mirror / rel
        if rel not in self.synced:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.synced[rel] = (path, None)
        return path

    def sync(self, *, force: bool = False) -> None:
        """Upload each log that changed since its last upload (its last MAX_LOG_UPLOAD_BYTES), at
        most every LOG_SYNC_S unless `force`; a failure is logged and tried again next time."""
        now = time.monotonic()
        if not force and (not self.ok or now - self.last_sync < LOG_SYNC_S):
            return
        self.last_sync = now
        for rel, (path, sent) in list(self.synced.items()):
            try:
                st = path.stat()
                seen = (st.st_size, st.st_mtime_ns)
                if seen == sent:
                    continue
                with open(path, "rb") as f:
                    f.seek(max(0, st.st_size - MAX_LOG_UPLOAD_BYTES))
                    data = f.read(MAX_LOG_UPLOAD_BYTES)
                self.share.write_bytes(rel, data)
                self.synced[rel] = (path, seen)
            except FileNotFoundError:
                continue
            except (OSError, ClusterError) as e:
                logger.warning("could not upload %s: %s", rel, e)
                return


def books_for(root: str, home: Path) -> MountBooks | BucketBooks:
    """The books of the agent's --root: a bucket URL, else the share's mount point."""
    return BucketBooks(root, home) if is_object_url(root) else MountBooks(Path(root), home)


def last_error(log: Path) -> str:
    """The last `error: ...` line a `tasks run` wrote to its run's log `log` (bounded), or ""."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - ERROR_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    errors = [line for line in tail.splitlines() if line.startswith("error: ")]
    return errors[-1][:records.MAX_PROBLEM] if errors else ""
