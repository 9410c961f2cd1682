"""Security on the lab: jailed SFTP-only keys on the head, verified host keys, no leaked secrets.

The head's user for both keys is chrooted to a folder that holds only the share, may run
nothing but internal-sftp, and may not forward anything; a changed host key stops the
worker's mount as it stops the laptop; private keys never reach the share, the logs or
`fab status`; hostile file names in a `--cmd` task over SSHFS are only names.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
from pathlib import Path

import paramiko
import psutil
import pytest

from cluster import jail, lifecycle
from cluster.config import load
from cluster.errors import ConfigError
from cluster.session import Cluster
from cluster.procs import ProcRecord
from labs import REPO

SSH_TIMEOUT_S = 20
HOSTILE = [
    "with space.txt",
    "single'quote.txt",
    'double"quote.txt',
    "semi; rm -f canary.txt; x.txt",
    "$(touch pwned-dollar).txt",
    "`touch pwned-backtick`.txt",
    "new\nline.txt",
    "naïve café 日本語.txt",
    "-rf.txt",
]
HOSTILE_CMD = "cat {src} > {out} && printf '%s\\n' {name} >> {out}"


def head_client(lab, key: Path) -> paramiko.SSHClient:
    """An SSH connection to the lab head as its jailed user, verifying its host key."""
    c = paramiko.SSHClient()
    c.load_host_keys(str(lab.config.ssh.known_hosts))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(lab.config.head.address, lab.config.head.port, username=lab.config.head.user,
              key_filename=str(key), look_for_keys=False, allow_agent=False, timeout=SSH_TIMEOUT_S)
    return c


def openssh(lab, key: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The OpenSSH client, as someone who has the key would use it."""
    h = lab.config.head
    return subprocess.run(
        ["ssh", "-F", "none", "-p", str(h.port), "-i", str(key), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={lab.config.ssh.known_hosts}", f"{h.user}@{h.address}", *args],
        capture_output=True, text=True, timeout=SSH_TIMEOUT_S, stdin=subprocess.DEVNULL)


@pytest.fixture
def head_lab(make_lab):
    """A lab with its head up and no VMs: enough to probe the jail."""
    lab = make_lab(workers=0)
    lab.fab_ok("up")
    return lab


def test_head_keys_are_sftp_only_and_jailed(head_lab):
    for which in ("worker_key", "key"):
        probe_head_with(head_lab, which)


def probe_head_with(lab, which: str) -> None:
    key = getattr(lab.config.ssh, which)
    share = lab.config.head.share
    (share / "inside.txt").write_text("in the share\n")
    # A symlink someone left in the share: a chroot resolves it inside the jail, not on the head.
    (share / "escape").unlink(missing_ok=True)
    (share / "escape").symlink_to("/etc/passwd")

    # No shell, no command: the OpenSSH client gets internal-sftp's refusal.
    r = openssh(lab, key, "id; cat /etc/passwd; touch /tmp/pwned-by-key")
    assert r.returncode != 0
    assert "uid=" not in r.stdout and "root:" not in r.stdout
    assert "sftp connections only" in r.stdout + r.stderr
    assert not Path("/tmp/pwned-by-key").exists()

    c = head_client(lab, key)
    try:
        t = c.get_transport()
        ch = t.open_session()
        ch.exec_command("id")
        assert ch.recv_exit_status() != 0 and b"uid=" not in ch.recv(4096)
        with pytest.raises(paramiko.SSHException):
            t.open_session().get_pty()  # PermitTTY no
        with pytest.raises(paramiko.ChannelException):  # direct-tcpip: AllowTcpForwarding no
            t.open_channel("direct-tcpip", (lab.config.head.address, lab.config.head.port),
                           ("127.0.0.1", 0), timeout=SSH_TIMEOUT_S)
        with pytest.raises(paramiko.SSHException):  # remote forwarding too
            t.request_port_forward("127.0.0.1", 0)

        sftp = c.open_sftp()
        assert sftp.normalize(".") == "/share", "the session starts in the share"
        assert sftp.listdir("/") == ["share"], "the jail holds the share and nothing else"
        for outside in ("/etc/passwd", "/share/../etc/passwd", "/share/escape",
                        str(lab.settings.state_dir / "head" / "ssh_host_ed25519_key"),
                        str(lab.config.ssh.worker_key)):
            with pytest.raises(FileNotFoundError):
                sftp.open(outside).read()
        for forbidden in ("/evil.txt", "/share/../evil.txt"):
            with pytest.raises(PermissionError):
                sftp.open(forbidden, "w").write(b"x")
        with pytest.raises(PermissionError):
            sftp.mkdir("/evil")
        with pytest.raises(OSError):
            sftp.rename("/share/inside.txt", "/moved-out.txt")
        assert not (Path(lab.config.head.jail) / "evil.txt").exists()

        # Inside the share, the user reads and writes; the file is the jailed user's.
        assert sftp.open("/share/inside.txt").read() == b"in the share\n"
        with sftp.open(f"/share/written-with-{which}.txt", "w") as f:
            f.write(b"ok")
    finally:
        c.close()
    written = share / f"written-with-{which}.txt"
    assert written.read_bytes() == b"ok"
    assert written.stat().st_uid == pwd.getpwnam(lab.config.head.user).pw_uid


def test_head_jail_is_root_owned_and_the_user_has_no_shell(head_lab):
    cfg = head_lab.config
    jail = Path(cfg.head.jail)
    for d in [*jail.parents, jail]:
        st = d.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, f"{d} must be root-owned, writable only by root"
    pw = pwd.getpwnam(cfg.head.user)
    assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_uid != 0
    sshd_config = (head_lab.settings.state_dir / "head" / "sshd_config").read_text()
    block = sshd_config[sshd_config.index(f"Match User {cfg.head.user}"):]
    for line in (f"ChrootDirectory {cfg.head.jail}", "ForceCommand internal-sftp -d /share",
                 "AllowTcpForwarding no", "X11Forwarding no", "PermitTTY no", "PermitTunnel no"):
        assert line in block
    assert "PermitRootLogin no" in sshd_config and f"AllowUsers {cfg.head.user}" in sshd_config
    keys_file = Path(cfg.head.jail).parent / ".spotfan-keys" / cfg.head.user
    assert f"AuthorizedKeysFile {keys_file}" in sshd_config
    keys = keys_file.read_text().splitlines()
    assert len(keys) == 2 and all(k.startswith("restrict,") for k in keys)
    # The bind mount of the share lives in the head's own mount namespace only.
    assert not os.path.ismount(jail / "share") and list((jail / "share").iterdir()) == []


def private_key_bodies(*keys: Path) -> list[str]:
    """Lines of base64 that only a private key file holds (long enough never to match by chance)."""
    out = []
    for k in keys:
        out += [ln for ln in k.read_text().splitlines() if ln and not ln.startswith("-----")]
    return out


def test_a_run_with_hostile_names_over_sshfs_leaks_no_secret(make_lab):
    lab = make_lab(workers=1, idle_timeout=120)
    share = lab.share
    (share / "hostile").mkdir(parents=True)
    for name in HOSTILE:
        (share / "hostile" / name).write_text(f"content of {name}\n")
    (share / "canary.txt").write_text("still here\n")
    said = [lab.fab_ok("up")]
    said.append(lab.fab_ok("run", HOSTILE_CMD, "--src", "hostile/*", "--out", "hostile_out/{stem}.out",
                           "--wait", "--wait-timeout", "120"))
    assert "done" in said[-1], said[-1]

    for name in HOSTILE:
        assert (share / "hostile_out" / f"{name[:-4]}.out").read_text() == f"content of {name}\n{name}\n"
    assert len(list((share / "hostile_out").iterdir())) == len(HOSTILE)
    assert (share / "canary.txt").read_text() == "still here\n"
    assert not list(share.rglob("pwned*")) and not list(lab.folder.rglob("pwned*"))

    status = lab.fab_ok("status", "--json")
    json.loads(status)
    said += [status, lab.fab_ok("status"), lab.fab_ok("logs", lab.config.vm_names()[0])]
    cfg = lab.config
    vm = cfg.vm_names()[0]
    vm_dir = lab.settings.state_dir / "vms" / vm
    private = [cfg.ssh.key, cfg.ssh.worker_key, lab.settings.state_dir / "head" / "ssh_host_ed25519_key",
               vm_dir / "ssh" / "ssh_host_ed25519_key", lab.provider.vm_home(vm) / "worker_key"]
    for k in private:
        assert k.stat().st_mode & 0o777 == 0o600, f"{k} must be mode 0600"
    assert cfg.ssh.known_hosts.stat().st_mode & 0o077 == 0
    secrets = private_key_bodies(*private)
    assert secrets, "the keys have bodies to look for"

    def leaks(text: str) -> list[str]:
        return (["PRIVATE KEY"] if "PRIVATE KEY" in text else []) + [s for s in secrets if s in text]

    # The share: every file, the engine's and the cluster layer's bookkeeping included.
    for f in (p for p in share.rglob("*") if p.is_file()):
        assert not leaks(f.read_text(errors="replace")), f"private key material in the share: {f}"
    # Every log: the head's sshd, each VM's console, sshd, sshfs and agent, the run logs.
    logs = [p for p in lab.settings.state_dir.rglob("*.log")] + list(share.rglob("*.log"))
    assert any(p.name == "sshfs.log" for p in logs) and any(p.name == "agent.log" for p in logs)
    for f in logs:
        assert not leaks(f.read_text(errors="replace")), f"private key material in {f}"
    # What fab printed, `fab status --json` included.
    for text in said:
        assert not leaks(text), "private key material in fab's output"

    # The worker key on the VM opens no shell on the head either.
    check = ('ssh -F none -i "$SPOTFAN_HOME/worker_key" -o IdentitiesOnly=yes -o BatchMode=yes '
             '-o StrictHostKeyChecking=yes -o UserKnownHostsFile="$SPOTFAN_HOME/known_hosts" '
             f'-p {cfg.head.port} {cfg.head.user}@{cfg.head.address} id; echo "exit=$?"')
    out = lab.fab_ok("exec", check)
    assert "sftp connections only" in out and "uid=" not in out and "exit=0" not in out


def test_changed_head_host_key_stops_the_laptop_and_the_worker_mount(make_lab):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    cfg = lab.config
    head = lab.settings.state_dir / "head"
    rec = ProcRecord(**json.loads((head / "sshd.json").read_text()))
    p = rec.process()
    assert p is not None
    p.kill()
    p.wait(10)
    key = head / "ssh_host_ed25519_key"
    for f in (key, key.with_name(key.name + ".pub")):
        f.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    # The head comes back with another key; the laptop's and the VM's known_hosts keep the old one.
    lab.provider.start_head(share=cfg.head.share, address=cfg.head.address, port=cfg.head.port,
                            authorized=jail.authorized_keys(cfg), user=cfg.head.user,
                            jail=cfg.head.jail, workers=cfg.workers)

    st = lab.fab("status")
    assert st.returncode == 3, st.stdout + st.stderr
    assert "host key of head" in st.stderr and "changed" in st.stderr and "do not proceed" in st.stderr

    r = lab.fab("exec", 'sh "$SPOTFAN_HOME/mount.sh" remount')
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the head's host key changed" in r.stdout and "do not proceed" in r.stdout
    assert re.search(r"presented SHA256:\S+", r.stdout), r.stdout

    # The lab trusts its own head: `fab heal` refreshes both known_hosts and remounts.
    healed = lab.fab_ok("heal")
    assert "mount: ok" in healed, healed
    assert "mount: ok" in lab.fab_ok("exec", 'sh "$SPOTFAN_HOME/mount.sh" check')


def test_fab_down_removes_the_lab_head_user_and_jail(make_lab):
    lab = make_lab(workers=0)
    lab.fab_ok("up")
    user, jail = lab.config.head.user, Path(lab.config.head.jail)
    keys_file = jail.parent / ".spotfan-keys" / user
    assert pwd.getpwnam(user) and jail.is_dir() and keys_file.is_file()
    (lab.share / "data.txt").write_text("keep me\n")
    lab.fab_ok("down")
    with pytest.raises(KeyError):
        pwd.getpwnam(user)
    assert not jail.exists() and not keys_file.exists()
    assert (lab.share / "data.txt").read_text() == "keep me\n", "the share and its data stay"
    assert not any(p.info["username"] == user for p in psutil.process_iter(["username"]))
    lab.fab_ok("down")  # idempotent
    lab.fab_ok("up")  # and back, with the share the new user's
    assert lab.share.stat().st_uid == pwd.getpwnam(user).pw_uid
    assert (lab.share / "data.txt").read_text() == "keep me\n"


# -- no lab needed ------------------------------------------------------------------------

FORBIDDEN = [  # split so that this file does not match itself
    "StrictHostKeyChecking" + "=no", "StrictHostKeyChecking" + " no", "AutoAdd" + "Policy",
    "Warning" + "Policy", "KnownHostsFile" + "=/dev/null", "KnownHostsFile" + " /dev/null",
]


def test_nothing_in_code_scripts_or_tests_turns_host_key_checking_off():
    skip = {".venv", ".git", ".lab", ".pytest_cache", "node_modules", "__pycache__"}
    hits = []
    for path in REPO.rglob("*"):
        if skip & set(path.relative_to(REPO).parts) or not path.is_file():
            continue
        if path.suffix not in {".py", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml"}:
            continue
        text = path.read_text(errors="replace")
        hits += [f"{path.relative_to(REPO)}: {bad}" for bad in FORBIDDEN if bad.lower() in text.lower()]
    assert hits == []


def test_keys_inside_the_share_are_refused(tmp_path):
    base = '[cluster]\nname = "demo"\n[head]\naddress = "127.0.0.1"\nshare = "share"\n'
    for extra, field in (('[ssh]\nworker_key = "share/keys/worker"\n', "[ssh] worker_key"),
                         ('[ssh]\nkey = "share/laptop"\n', "[ssh] key"),
                         ('[lab]\nstate_dir = "share/.lab"\n', "[lab] state_dir")):
        (tmp_path / "cluster.toml").write_text(base + extra)
        with pytest.raises(ConfigError, match=re.escape(field) + r" = .* is inside \[head\] share"):
            load(tmp_path / "cluster.toml")


def test_the_lab_never_serves_the_share_unjailed_or_as_root(tmp_path):
    base = '[cluster]\nname = "demo"\n[head]\naddress = "127.0.0.1"\nshare = "share"\n'
    for extra in ('user = "root"\n', 'jail = ""\n'):
        (tmp_path / "cluster.toml").write_text(base + extra)
        with pytest.raises(ConfigError, match="the lab always jails"):
            load(tmp_path / "cluster.toml")
    (tmp_path / "cluster.toml").write_text(base + 'jail = "/srv/a b"\n')
    with pytest.raises(ConfigError, match=r"\[head\] jail = '/srv/a b' must be an absolute folder"):
        load(tmp_path / "cluster.toml")
    (tmp_path / "cluster.toml").write_text(base)
    c = load(tmp_path / "cluster.toml")
    assert (c.head.user, c.head.jail, c.head.sftp_share) == ("spotfan-demo", "/srv/spotfan/demo", "/share")


def test_head_setup_prints_the_match_block_for_a_real_head(tmp_path):
    (tmp_path / "cluster.toml").write_text(
        '[cluster]\nname = "demo"\nprovider = "gce"\n[head]\naddress = "10.0.0.2"\nshare = "/data/demo"\n'
        '[gce]\nproject = "p"\nzones = ["us-central1-a"]\nimage = "spotfan-worker"\n')
    with Cluster(load(tmp_path / "cluster.toml")) as cluster:
        steps = lifecycle.head_setup(cluster)
    for line in ("Match User spotfan-demo", "ChrootDirectory /srv/spotfan/demo",
                 "ForceCommand internal-sftp -d /share", "AllowTcpForwarding no", "PermitTTY no",
                 "mount --bind /data/demo /srv/spotfan/demo/share", "--shell /usr/sbin/nologin"):
        assert line in steps
    assert steps.count('restrict,command="internal-sftp -d /share" ssh-ed25519 ') == 2
    assert "PRIVATE" not in steps
