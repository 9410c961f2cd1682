"""cluster.toml: parsing, defaults, path resolution and error messages (no lab needed)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import load
from cluster.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[cluster]
name = "demo"
[head]
address = "127.0.0.1"
share = "share"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def test_repo_cluster_toml_is_valid():
    c = load(REPO / "cluster.toml")
    assert c.provider == "lab"
    assert c.lab.address_prefix.startswith("127.")
    assert c.ssh.key.is_absolute() and c.head.share.is_absolute()
    assert c.head.share not in c.ssh.key.parents, "keys must never live in the shared directory"
    # A venv's bin/python is a symlink; resolving it would lose the venv's packages.
    assert c.python == str(REPO / ".venv" / "bin" / "python")


def test_defaults_and_relative_paths(tmp_path):
    c = load(write(tmp_path, MINIMAL))
    assert c.head.share == tmp_path / "share"
    assert c.ssh.known_hosts.parent == tmp_path / ".spotfan-keys" / "demo"
    assert c.lab.state_dir == tmp_path / ".lab" / "demo"
    assert c.mount_point == "/mnt/spotfan"
    assert c.vm_names(3) == ["demo-w001", "demo-w002", "demo-w003"]


@pytest.mark.parametrize("text, field", [
    ("[cluster]\nname = 'demo'\n", "head.address"),
    (MINIMAL.replace('name = "demo"', 'name = "Demo_1"'), "cluster.name"),
    (MINIMAL + "[lab]\naddress_prefix = '10.0.0.'\n", "lab.address_prefix"),
    (MINIMAL.replace('[head]', 'workers = "three"\n[head]'), "cluster.workers"),
    (MINIMAL.replace('[head]', 'idle_timeout = 0\n[head]'), "cluster.idle_timeout"),
    (MINIMAL.replace('[head]', 'zones = "us-east1-b"\n[head]'), "cluster.zones"),
])
def test_errors_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load(write(tmp_path, text))


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="SPOTFAN_CONFIG"):
        load(tmp_path / "nope.toml")


def test_remote_paths_must_be_absolute_off_the_lab(tmp_path):
    text = MINIMAL.replace('name = "demo"', 'name = "demo"\nprovider = "gce"\nmount_point = "mnt"')
    with pytest.raises(ConfigError, match="mount_point.*absolute"):
        load(write(tmp_path, text))
