"""The agent's watch on the share's mount: `mount.sh check`, and a dead or missing mount mounted again
with jittered, bounded backoff (so a fleet does not remount in step)."""
from __future__ import annotations

import logging
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("cluster.agent")

MOUNT_CHECK_TIMEOUT_S = 15.0
MOUNT_TIMEOUT_S = 120.0  # one `mount.sh mount` (it retries a few times itself)
REMOUNT_FIRST_S = 30.0  # a dead or missing mount is mounted again after this (and jitter) ...
REMOUNT_MAX_S = 300.0  # ... doubling up to this ...
MAX_REMOUNTS = 1000  # ... at most this many times per boot (the guard stops an idle VM far sooner)
REMOUNT_JITTER = 0.5  # each wait is stretched by up to this fraction


@dataclass
class MountWatch:
    """What the agent knows of the mount (cluster/vm/mount.sh in `home`), and when to mount it again."""

    home: Path  # SPOTFAN_HOME: mount.sh and boot.env are there
    ok: bool = False  # checked before anything touches the share
    state: str = "unknown"  # ok | dead | absent, as mount.sh check says
    remounts: int = 0
    back_after: int = 0  # remounts it took, when it last came back
    next_remount: float = 0.0  # monotonic time of the next remount, while it is not ok

    def check(self, now: float) -> str:
        """`mount.sh check`, and a remount when one is due: "back" when the mount came back,
        "remounted" when it was just mounted again (look again at once), else ""."""
        try:
            r = subprocess.run(["sh", str(self.home / "mount.sh"), "check"], capture_output=True,
                               text=True, timeout=MOUNT_CHECK_TIMEOUT_S, cwd=self.home)
            said = (r.stdout.strip() or r.stderr.strip())
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            said, ok = "mount: dead (mount.sh check hung)", False
        was = self.state
        self.state = "ok" if ok else ("absent" if "absent" in said else "dead")
        self.ok = ok
        if ok:
            back = was not in ("ok", "unknown")
            if back:
                self.back_after = self.remounts
            self.remounts = 0
            return "back" if back else ""
        if was != self.state:
            logger.warning("share not usable: %s", said)
            self.next_remount = now + self._backoff()
        if now >= self.next_remount and self.remounts < MAX_REMOUNTS:
            self.remounts += 1
            try:
                m = subprocess.run(["sh", str(self.home / "mount.sh"), "mount"], capture_output=True,
                                   text=True, timeout=MOUNT_TIMEOUT_S, cwd=self.home)
                lines = m.stdout.strip().splitlines()[-1:] or [m.stderr.strip()]
            except subprocess.TimeoutExpired:
                lines = [f"mount.sh mount took longer than {MOUNT_TIMEOUT_S:g}s"]
            logger.info("mounting the share again (try %d): %s", self.remounts, lines[0])
            self.next_remount = now + self._backoff()
            return "remounted"
        return ""

    def _backoff(self) -> float:
        base = min(REMOUNT_MAX_S, REMOUNT_FIRST_S * 2 ** min(self.remounts, 10))
        return base * (1 + REMOUNT_JITTER * secrets.randbelow(1001) / 1000)
