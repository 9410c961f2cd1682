"""The head's SFTP jail as text: authorized_keys lines, the sshd Match block, the fleet's sshd limits, setup steps.

Both keys log in as one dedicated user per cluster (`head.user`, default
`spotfan-NAME`), whose sshd `Match User` block chroots it into `head.jail` (root-owned,
like every folder above it), forces `internal-sftp`, and forbids TCP/socket/agent/X11
forwarding, tunnels and TTYs; each key also carries `restrict`. The share is bind-mounted
at JAIL/share and is the only thing the user can write, as `/share` to its clients. One
user for both keys keeps every file on the share owned by one uid, so the laptop's run
requests and the VMs' outputs never lock each other out; the keys stay separate, so
each can be revoked alone.

The lab makes all of this on this machine (cluster.providers.lab: its head and its
users); a GCE head VM runs `setup_steps` from its startup-script. On a real head spotfan
never edits /etc/ssh: `setup_steps` is what its administrator runs (`fab head-setup`
prints it).
"""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING

from cluster.ssh_keys import public_key

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

JAIL_SHARE = "/share"  # where the share sits inside the head's chroot jail
NOLOGIN = "/usr/sbin/nologin"
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
    measured here, 64 simultaneous SFTP connects lost 27 (bench/bench_fleet_up.py). Room for every VM's
    mount and its runner's own SFTP session (tasks.direct) or a remount, plus the laptop's sessions; PerSourceMaxStartups none because
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
