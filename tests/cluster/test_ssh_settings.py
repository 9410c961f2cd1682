"""The laptop's SSH uses the cluster's settings and nothing of the user's own.

`fab` runs against a lab cluster with a hostile ~/.ssh/config and ~/.fabric.yaml in a
temporary HOME (agent forwarding, a personal key, a ProxyCommand and a `Match exec` that
would leave trace files, a wrong HostName, Port and User) and with a real ssh-agent on
SSH_AUTH_SOCK holding a personal key: every command still connects, no trace appears, the
agent is not reachable from the VM's session, and only the cluster's keys log in.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from labs import SESSION_OCTET

AGENT_TIMEOUT_S = 10
SSHD_RELOAD_TIMEOUT_S = 20
SSH_TIMEOUT_S = 20
POLL_S = 0.1
INPUTS = ["a.txt", "b c.txt", "d.txt"]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, timeout=SSH_TIMEOUT_S)
    return fingerprint(path)


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(key)], capture_output=True, text=True,
                         check=True, timeout=SSH_TIMEOUT_S).stdout
    return out.split()[1]  # SHA256:...


@pytest.fixture
def agent(tmp_path: Path):
    """A real ssh-agent (by pid, in the foreground) holding a personal key; yields
    (socket path, the key's fingerprint)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(POLL_S)
        key = tmp_path / "agent_key"
        fp = keygen(key)
        env = {"SSH_AUTH_SOCK": str(sock), "PATH": "/usr/bin:/bin"}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, timeout=SSH_TIMEOUT_S,
                       capture_output=True)
        listed = subprocess.run(["ssh-add", "-l"], env=env, capture_output=True, text=True,
                                timeout=SSH_TIMEOUT_S).stdout
        assert fp in listed, "the agent holds the key"
        yield sock, fp
    finally:
        proc.terminate()
        proc.wait(timeout=AGENT_TIMEOUT_S)


def hostile_home(home: Path, traces: Path) -> Path:
    """~/.ssh/config and ~/.fabric.yaml that would change every connection they touch."""
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    personal = home / ".ssh" / "id_personal"
    keygen(personal)
    (home / ".ssh" / "config").write_text(f"""\
Match exec "touch {traces}/match-exec-ran"
    ForwardAgent yes
Host *
    ForwardAgent yes
    IdentityFile {personal}
    ProxyCommand sh -c 'touch {traces}/proxycommand-ran; exec false'
    HostName 127.{SESSION_OCTET}.250.250
    Port 2
    User mallory
""")
    (home / ".fabric.yaml").write_text(f"""\
forward_agent: true
connect_kwargs:
  key_filename: [{personal}]
""")
    return personal


def allow_agent_forwarding(lab, vm: str) -> None:
    """Make the VM's sshd accept agent forwarding, as a stock Debian sshd does (the lab's
    refuses it), so the test sees whether the laptop asks for it."""
    config = lab.settings.state_dir / "vms" / vm / "ssh" / "sshd_config"
    text = config.read_text()
    assert "AllowAgentForwarding no" in text
    config.write_text(text.replace("AllowAgentForwarding no", "AllowAgentForwarding yes"))
    listeners = [p for p in psutil.process_iter(["cmdline"])
                 if str(config) in " ".join(p.info["cmdline"] or []) and "-D" in (p.info["cmdline"] or [])]
    assert len(listeners) == 1, f"one sshd serves {vm}: {listeners}"
    listeners[0].send_signal(signal.SIGHUP)  # sshd re-executes itself with the new config


def openssh_with_agent(lab, address: str, agent_sock: Path, command: str) -> subprocess.CompletedProcess[str]:
    """OpenSSH asked explicitly to forward the agent, with the cluster's key and known_hosts."""
    ssh = lab.config.ssh
    return subprocess.run(
        ["ssh", "-F", "none", "-A", "-i", str(ssh.key), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={ssh.known_hosts}", f"{ssh.user}@{address}", command],
        capture_output=True, text=True, timeout=SSH_TIMEOUT_S, stdin=subprocess.DEVNULL,
        env={"SSH_AUTH_SOCK": str(agent_sock), "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})


def test_fab_uses_only_the_clusters_ssh_settings(make_lab, tmp_path: Path, monkeypatch, agent) -> None:
    agent_sock, agent_fp = agent
    traces = tmp_path / "traces"
    traces.mkdir()
    home = tmp_path / "home"
    personal = hostile_home(home, traces)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_sock))

    lab = make_lab(workers=1)
    lab.fab_ok("up")
    (vm,) = lab.provider.list()

    # The VM now accepts agent forwarding: a client that asks for it gets the agent there.
    allow_agent_forwarding(lab, vm.name)
    probe = 'echo "agent=[${SSH_AUTH_SOCK:-}]"; ssh-add -l 2>&1 || true'
    deadline = time.monotonic() + SSHD_RELOAD_TIMEOUT_S
    while True:
        control = openssh_with_agent(lab, vm.address, agent_sock, probe)
        if control.returncode == 0 and "agent=[/" in control.stdout:
            break
        assert time.monotonic() < deadline, f"sshd never allowed forwarding: {control}"
        time.sleep(POLL_S * 5)
    assert agent_fp in control.stdout, "the forwarded agent is usable from the VM"

    # fab, in the same environment: its session on the VM has no agent.
    out = lab.fab_ok("exec", probe)
    assert "agent=[]" in out and agent_fp not in out, out

    for name in INPUTS:
        (lab.share / "in").mkdir(exist_ok=True)
        (lab.share / "in" / name).write_text(f"content of {name}\n")
    lab.fab_ok("run", "cp {src} {out}", "--src", "in/*", "--out", "o/{name}", "--wait",
               "--wait-timeout", "120")
    assert sorted(p.name for p in (lab.share / "o").iterdir()) == sorted(INPUTS)
    status = lab.fab_ok("status")
    assert "done" in status, status

    assert sorted(p.name for p in traces.iterdir()) == [], "the user's ssh_config was read"
    # Every login, on the VM and on the head, was with a cluster key; the personal keys
    # (ssh_config's IdentityFile, the agent's) were never even offered.
    cluster_keys = {fingerprint(lab.config.ssh.key), fingerprint(lab.config.ssh.worker_key)}
    accepted: set[str] = set()
    for log in lab.settings.state_dir.rglob("sshd.log"):
        text = log.read_text(errors="replace")
        accepted |= set(re.findall(r"Accepted publickey for \S+ from \S+ port \d+ ssh2: \S+ (SHA256:\S+)", text))
        assert fingerprint(personal) not in text, f"{log} saw the ssh_config's IdentityFile"
        assert "mallory" not in text, f"{log} saw the ssh_config's User"
    assert accepted and accepted <= cluster_keys, (accepted, cluster_keys)
