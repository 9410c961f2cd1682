"""The head's SFTP jail: how the laptop's and the VMs' keys are confined on the head.

Both keys log in as one dedicated user per cluster (`head.user`, default
`spotfan-NAME`), whose sshd `Match User` block chroots it into `head.jail` (root-owned,
like every folder above it), forces `internal-sftp`, and forbids TCP/socket/agent/X11
forwarding, tunnels and TTYs; each key also carries `restrict`. The share is bind-mounted
at JAIL/share and is the only thing the user can write, as `/share` to its clients. One
user for both keys keeps every file on the share owned by one uid, so the laptop's run
requests and the VMs' outputs never lock each other out; the keys stay separate, so
each can be revoked alone.

The lab makes all of this on this machine (`LabProvider.start_head`): the user (marked
in its GECOS field, so only a user the lab made is ever deleted), the jail folders, and
a head sshd in its own mount namespace that bind-mounts the share into the jail (so no
mount is visible to, or left behind on, the host). On a real head spotfan never edits
/etc/ssh: `setup_steps` is what its administrator runs (`fab head-setup` prints it).
"""
from __future__ import annotations

import logging
import os
import pwd
import shlex
import stat
import subprocess
import time
from pathlib import Path

from cluster.config import JAIL_SHARE, ClusterConfig
from cluster.errors import ProvisionError
from cluster.keys import public_key

logger = logging.getLogger(__name__)

NOLOGIN = "/usr/sbin/nologin"
USERADD_TIMEOUT_S = 30
USERDEL_ATTEMPTS = 10  # userdel refuses while a process of the user lives; its sessions end fast
USERDEL_RETRY_S = 0.2
USERDEL_BUSY = 8  # userdel's exit code for "user is currently used by a process"
KEYS_DIR = "/etc/ssh/spotfan"  # where a real head keeps the jailed users' authorized_keys


def authorized_keys(config: ClusterConfig) -> list[str]:
    """The head user's authorized_keys lines: both keys restricted, SFTP only, in the share.

    The `command=` is belt and braces: the Match block's ForceCommand already wins, but
    the key alone must not open a shell on a head whose sshd_config lacks the block.
    """
    start = shlex.quote(config.head.sftp_share).replace('"', '\\"')
    opts = f'restrict,command="internal-sftp -d {start}"'
    return [f"{opts} {public_key(config.ssh.key)}", f"{opts} {public_key(config.ssh.worker_key)}"]


def match_block(*, user: str, jail: str, authorized_keys_file: str | None = None) -> str:
    """The sshd_config `Match User` block that jails `user` (it must come after every global line)."""
    lines = [f"Match User {user}"]
    if authorized_keys_file:
        lines.append(f"    AuthorizedKeysFile {authorized_keys_file}")
    lines += [
        f"    ChrootDirectory {jail}",
        f"    ForceCommand internal-sftp -d {JAIL_SHARE}",
        "    AllowTcpForwarding no",
        "    AllowStreamLocalForwarding no",
        "    AllowAgentForwarding no",
        "    X11Forwarding no",
        "    PermitTTY no",
        "    PermitTunnel no",
        "    PermitOpen none",
        "    PermitListen none",
        "    PasswordAuthentication no",
        "    KbdInteractiveAuthentication no",
    ]
    return "\n".join(lines) + "\n"


FLEET_MIN = 16  # sshd is sized for at least this many VMs connecting at once
FLEET_CONF = "/etc/ssh/sshd_config.d/00-spotfan-fleet.conf"  # included at the top: its values win


def fleet_size(workers: int) -> int:
    """The fleet size sshd is set up for: a power of two, so small changes leave it alone."""
    return max(FLEET_MIN, 1 << (max(1, workers) - 1).bit_length())


def fleet_sshd_settings(workers: int) -> list[str]:
    """Global sshd_config lines for `workers` VMs that all connect at once (a fleet's boot).

    OpenSSH's default MaxStartups 10:30:100 drops unauthenticated connections past 10:
    measured here, 64 simultaneous SFTP connects lost 27 (NOTES.md). Room for every VM's
    mount and a remount each, plus the laptop's sessions; PerSourceMaxStartups none because
    every VM may reach the head from one address (a NAT, or the lab's loopback);
    LoginGraceTime long enough for a CPU-bound burst of handshakes (128 took ~59 s on 2 cores).
    MaxSessions stays at 10: each mount and each laptop connection opens one session.
    """
    n = fleet_size(workers)
    begin = 2 * n + 10
    return [f"MaxStartups {begin}:30:{2 * begin}", "PerSourceMaxStartups none", "MaxSessions 10",
            f"LoginGraceTime {max(120, n)}"]


def fleet_steps(workers: int) -> str:
    """Shell that raises a real head's sshd limits to `fleet_sshd_settings` (never lowers them)."""
    lines = fleet_sshd_settings(workers)
    begin = lines[0].split()[1].split(":")[0]
    body = "".join(f"{ln}\n" for ln in lines)
    return f"""# sshd for a fleet of up to {fleet_size(workers)} VMs connecting at once (OpenSSH's default MaxStartups
# 10:30:100 drops connects past 10). Only raised, never lowered; checked after the reload.
have=$(sshd -T 2>/dev/null | awk '$1 == "maxstartups" {{ split($2, a, ":"); print a[1] }}')
if [ "${{have:-10}}" -lt {begin} ]; then
    install -d -m 755 /etc/ssh/sshd_config.d
    cat > {FLEET_CONF} <<'EOF'
{body}EOF
fi
"""


def fleet_check(workers: int) -> str:
    begin = fleet_sshd_settings(workers)[0].split()[1].split(":")[0]
    return f"""have=$(sshd -T 2>/dev/null | awk '$1 == "maxstartups" {{ split($2, a, ":"); print a[1] }}')
[ "${{have:-10}}" -ge {begin} ] || echo "spotfan: sshd still has MaxStartups ${{have:-10}}:...: put the lines of \
{FLEET_CONF} at the top of /etc/ssh/sshd_config (this sshd does not include sshd_config.d)" >&2
"""


def setup_steps(config: ClusterConfig, *, workers: int | None = None) -> str:
    """What the administrator of a real head runs, as root, to make and to remove the jail,
    and to size its sshd for `workers` VMs (default: cluster.toml's) connecting at once."""
    h = config.head
    n = config.workers if workers is None else workers
    keys = "".join(f"{line}\n" for line in authorized_keys(config))
    if not h.jail:
        return (
            f"# head.jail is empty: no chroot. The keys are limited to SFTP, but can read whatever\n"
            f"# {h.user} can read on the head. Put these lines in ~{h.user}/.ssh/authorized_keys:\n{keys}\n"
            + fleet_steps(n) + "sshd -t && systemctl reload ssh\n" + fleet_check(n)
        )
    user, jail, share, q = h.user, h.jail, str(h.share), shlex.quote
    keys_file = f"{KEYS_DIR}/{user}.keys"
    fstab = f"{share.replace(' ', chr(92) + '040')} {jail}{JAIL_SHARE} none bind 0 0"  # fstab spells " " \040
    block = match_block(user=user, jail=jail, authorized_keys_file=f"{KEYS_DIR}/%u.keys")
    return f"""\
# On the head {h.address}, as root: a jailed, SFTP-only user for spotfan cluster {config.name!r}.
# spotfan never edits a real head's /etc/ssh; these steps are idempotent.
id -u {user} >/dev/null 2>&1 || useradd --system --user-group --no-create-home \\
    --home-dir {JAIL_SHARE} --shell {NOLOGIN} --password '*' {user}
# The jail: it and every folder above it root-owned and not group/other-writable (sshd checks).
install -d -o root -g root -m 755 {jail} {jail}{JAIL_SHARE}
# The share: owned by the jailed user, who writes outputs, claims and logs into it.
install -d {q(share)} && chown -R {user}: {q(share)}
mountpoint -q {jail}{JAIL_SHARE} || mount --bind {q(share)} {jail}{JAIL_SHARE}
grep -qs ' {jail}{JAIL_SHARE} ' /etc/fstab || printf '%s\\n' {q(fstab)} >> /etc/fstab
# Its two keys (laptop, workers), readable by sshd as that user.
install -d -o root -g root -m 755 {KEYS_DIR}
cat > {keys_file} <<'EOF'
{keys}EOF
chmod 644 {keys_file}
# The Match block goes at the very end of /etc/ssh/sshd_config (not in sshd_config.d/,
# which is included at the top, where a Match would swallow the lines after it).
grep -q '^Match User {user}$' /etc/ssh/sshd_config || cat >> /etc/ssh/sshd_config <<'EOF'

{block}EOF
{fleet_steps(n)}sshd -t && systemctl reload ssh
{fleet_check(n)}
# To remove it: delete the Match block from /etc/ssh/sshd_config, `systemctl reload ssh`,
# umount {jail}{JAIL_SHARE}, delete its /etc/fstab line, rmdir {jail}{JAIL_SHARE} {jail},
# rm {keys_file}, userdel {user}. The share and its data stay.
"""


# -- making the jail on this machine (the lab) ---------------------------------------


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


def lab_keys_file(jail: Path, user: str) -> Path:
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
