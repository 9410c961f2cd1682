"""The head's jail made on this machine for the lab: the jailed user, the jail folders, its keys file.

The user is marked in its GECOS field, so that only a user the lab made is ever deleted;
the folders are checked the way sshd checks a ChrootDirectory. On a real head spotfan
never does any of this: cluster.jail.setup_steps is what its administrator runs.
"""
from __future__ import annotations

import logging
import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

from cluster.errors import ProvisionError
from cluster.jail import JAIL_SHARE, NOLOGIN

logger = logging.getLogger(__name__)

USERADD_TIMEOUT_S = 30
USERDEL_ATTEMPTS = 10  # userdel refuses while a process of the user lives; its sessions end fast
USERDEL_RETRY_S = 0.2
USERDEL_BUSY = 8  # userdel's exit code for "user is currently used by a process"


def ensure_user(user: str, *, marker: str) -> tuple[int, int]:
    """Make the jailed system user unless it exists; return its (uid, gid).

    A user that exists but was not made by this lab (its GECOS is not `marker`) is never
    taken over: it may be a real account, or another lab cluster's.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        # '*': no password, but not locked; with UsePAM no, sshd refuses a locked ("!") account.
        _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", JAIL_SHARE,
              "--shell", NOLOGIN, "--password", "*", "--comment", marker, user], what=f"useradd {user}")
        pw = pwd.getpwnam(user)
        logger.info("lab head: made system user %s (uid %d)", user, pw.pw_uid)
    if pw.pw_gecos != marker:
        raise ProvisionError(
            f"lab head: user {user!r} already exists and was not made by this lab cluster "
            f"(its comment is {pw.pw_gecos!r}); set head.user in cluster.toml to a new name"
        )
    return pw.pw_uid, pw.pw_gid


def remove_user(user: str, *, marker: str) -> None:
    """Delete the user if this lab made it (see `ensure_user`); a missing user is fine."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return
    if pw.pw_gecos != marker:
        logger.warning("lab head: not deleting user %s: this lab did not make it", user)
        return
    for attempt in range(1, USERDEL_ATTEMPTS + 1):
        r = subprocess.run(["userdel", user], capture_output=True, text=True, timeout=USERADD_TIMEOUT_S)
        if r.returncode == 0:
            logger.info("lab head: deleted system user %s", user)
            return
        if r.returncode != USERDEL_BUSY or attempt == USERDEL_ATTEMPTS:
            raise ProvisionError(f"lab head: userdel {user} failed: {r.stderr.strip()}; run `fab down` again")
        time.sleep(USERDEL_RETRY_S)


def ensure_dirs(jail: Path) -> None:
    """The jail folder and its share mount point, checked the way sshd checks a ChrootDirectory."""
    for d in [*reversed(jail.parents), jail]:
        if not d.exists():
            d.mkdir()
            os.chmod(d, 0o755)
        st = d.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise ProvisionError(
                f"lab head: {d} must be a root-owned folder that only root can write (sshd refuses a "
                f"chroot below anything else; it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
                "fix it, or set head.jail to another folder"
            )
    mount_point = jail / JAIL_SHARE.lstrip("/")
    mount_point.mkdir(mode=0o755, exist_ok=True)


def keys_file(jail: Path, user: str) -> Path:
    """Where the lab head keeps `user`'s authorized_keys: beside the jail, readable by that user."""
    return jail.parent / ".spotfan-keys" / user


def ensure_keys_dir(folder: Path) -> None:
    """A root-owned folder everyone may search and only root may write (like the jail's parents)."""
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise ProvisionError(
            f"lab head: {folder} must be a root-owned folder that only root can write (it holds the "
            "jailed users' authorized_keys); fix it, or set head.jail to another folder"
        )
    os.chmod(folder, 0o755)


def remove_dirs(jail: Path) -> None:
    """Remove the (empty) jail folders; rmdir never deletes content, so a share is never lost."""
    for d in (jail / JAIL_SHARE.lstrip("/"), jail):
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("lab head: left %s in place: %s", d, e.strerror)


def hand_over(share: Path, uid: int, gid: int) -> None:
    """Give the share to the jailed user (once: when its top folder belongs to someone else)."""
    if share.stat().st_uid == uid:
        return
    logger.info("lab head: handing %s over to uid %d", share, uid)
    os.lchown(share, uid, gid)
    for top, dirs, files in os.walk(share):
        for n in dirs + files:
            os.lchown(os.path.join(top, n), uid, gid)


def check_reachable(path: Path) -> None:
    """sshd reads authorized_keys as the jailed user: every folder above it must be searchable."""
    for d in path.parents:
        if not d.stat().st_mode & stat.S_IXOTH:
            raise ProvisionError(
                f"lab head: the jailed user cannot reach {path}: {d} is not searchable by others "
                f"(`chmod o+x {d}`), or set head.jail to a folder below one that is"
            )


def _run(argv: list[str], *, what: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=USERADD_TIMEOUT_S)
    except FileNotFoundError as e:
        raise ProvisionError(f"lab head: {argv[0]} not found (install passwd)") from e
    except subprocess.CalledProcessError as e:
        raise ProvisionError(f"lab head: {what} failed: {e.stderr.strip()}") from e
