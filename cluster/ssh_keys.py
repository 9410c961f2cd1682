"""SSH key pairs (mode 0600, made with ssh-keygen) and the per-cluster known_hosts files."""
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from cluster.errors import ClusterError, ConfigError
from tasks.fs import atomic_write

KEYGEN_TIMEOUT_S = 30


def ensure_key_pair(path: Path, *, comment: str) -> Path:
    """Create an ed25519 key pair at `path` (and `path`.pub) unless it exists; return `path`."""
    pub = path.with_name(path.name + ".pub")
    if path.exists() and pub.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigError(
                f"{path}: private key is readable by others (mode {path.stat().st_mode & 0o777:o}): "
                f"run `chmod 600 {path}`"
            )
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (path, pub):
        stale.unlink(missing_ok=True)
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True, capture_output=True, text=True, timeout=KEYGEN_TIMEOUT_S,
        )
    except FileNotFoundError as e:
        raise ClusterError("ssh-keygen not found: install openssh-client") from e
    except subprocess.CalledProcessError as e:
        raise ClusterError(f"ssh-keygen could not create {path}: {e.stderr.strip()}") from e
    os.chmod(path, 0o600)
    return path


def public_key(path: Path) -> str:
    """The "type base64 comment" line of the key pair whose private half is `path`."""
    return path.with_name(path.name + ".pub").read_text().strip()


def host_pattern(address: str, port: int) -> str:
    """How known_hosts names a host: bare for port 22, "[address]:port" otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


def known_hosts_lines(pattern: str, public_keys: Iterable[str]) -> list[str]:
    """known_hosts lines for one host from "type base64 [comment]" public keys."""
    return [f"{pattern} {' '.join(k.split()[:2])}" for k in public_keys]


def write_known_hosts(path: Path, lines_by_host: Mapping[str, Iterable[str]]) -> None:
    """Replace `path` with exactly these known_hosts lines (written to a temporary, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = "".join(f"{line}\n" for host in sorted(lines_by_host) for line in lines_by_host[host])
    atomic_write(path, text, mode=0o600)


def read_known_hosts(path: Path) -> dict[str, list[str]]:
    """The known_hosts lines of `path`, grouped by host pattern; empty if there is no file."""
    out: dict[str, list[str]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            out.setdefault(line.split()[0], []).append(line.strip())
    return out
