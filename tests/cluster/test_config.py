"""cluster.toml: parsing, defaults, path resolution and error messages (no lab needed)."""
from __future__ import annotations

import re
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
    assert c.settings.address_prefix.startswith("127.")
    assert c.ssh.key.is_absolute() and c.head.share.is_absolute()
    assert c.head.share not in c.ssh.key.parents, "keys must never live in the shared directory"
    # A venv's bin/python is a symlink; resolving it would lose the venv's packages.
    assert c.python == str(REPO / ".venv" / "bin" / "python")


def test_defaults_and_relative_paths(tmp_path):
    c = load(write(tmp_path, MINIMAL))
    assert c.head.share == tmp_path / "share"
    assert c.ssh.known_hosts.parent == tmp_path / ".spotfan-keys" / "demo"
    assert c.settings.state_dir == tmp_path / ".lab" / "demo"
    assert c.mount_point == "/mnt/spotfan"
    assert c.vm_names(3) == ["demo-w001", "demo-w002", "demo-w003"]


@pytest.mark.parametrize("text, message", [
    ("[cluster]\nname = 'demo'\n", r"\[head\] is required: add the table with `address = ...`, `share = ...`"),
    (MINIMAL.replace('name = "demo"', 'name = "Demo_1"'), r"\[cluster\] name = 'Demo_1': use lowercase"),
    (MINIMAL + "[lab]\naddress_prefix = '10.0.0.'\n", r"\[lab\] address_prefix = '10.0.0.': lab VMs live on loopback"),
    (MINIMAL.replace('[head]', 'workers = "three"\n[head]'),
     r"\[cluster\] workers = 'three': must be a whole number from 0 to 250"),
    (MINIMAL.replace('[head]', 'idle_timeout = 0\n[head]'), r"\[cluster\] idle_timeout = 0: must be a number of at least 1"),
    (MINIMAL.replace('[head]', 'zones = "us-east1-b"\n[head]'), r"\[cluster\] zones = 'us-east1-b': must be a list of strings"),
    (MINIMAL.replace('[head]', 'idle_action = "halt"\n[head]'), r"\[cluster\] idle_action = 'halt': must be one of 'stop', 'delete'"),
    (MINIMAL + "[ssh]\nkex_algorithms = 'curve25519-sha256 -oProxyCommand=x'\n",
     r"\[ssh\] kex_algorithms = 'curve25519-sha256 -oProxyCommand=x': must be OpenSSH key exchange names separated by commas"),
])
def test_errors_name_the_table_the_key_and_the_fix(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load(path)


# A typo in every table, and what it is taken for.
@pytest.mark.parametrize("table, typo, meant", [
    ("cluster", "idle_timout = 60", "idle_timeout"),
    ("cluster", "wrokers = 3", "workers"),
    ("head", "addres = '127.0.0.2'", "address"),
    ("ssh", "connect_timout = 3", "connect_timeout"),
    ("lab", "adress_prefix = '127.0.9.'", "address_prefix"),
])
def test_a_typo_in_any_table_is_refused_with_the_closest_key(tmp_path, table, typo, meant):
    text = MINIMAL + "[ssh]\n[lab]\n"
    text = text.replace(f"[{table}]\n", f"[{table}]\n{typo}\n", 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: [{table}] {typo.split()[0]} is not a known key; did you mean {meant}?"


GCE = MINIMAL.replace('name = "demo"', 'name = "demo"\nprovider = "gce"').replace('share = "share"', 'share = "/srv/share"') + """
[gce]
project = "p"
zones = ["us-central1-a"]
image = "spotfan-worker"
"""


@pytest.mark.parametrize("where, typo, message", [
    ("[gce]\n", "zone = 'us-central1-b'", "[gce] zone is not a known key; did you mean zones?"),
    ("[gce]\n", "machine_typ = 'e2-small'", "[gce] machine_typ is not a known key; did you mean machine_type?"),
    (None, "[gce.head]\ncreate = true\nmachine = 'e2-small'",
     "[gce.head] machine is not a known key; did you mean machine_type?"),
    (None, "[gce.prices]\ne2-standard-4 = { standrd = 0.13 }",
     "[gce.prices.e2-standard-4] standrd is not a known key; did you mean standard?"),
])
def test_the_gce_tables_are_read_by_the_same_strict_reader(tmp_path, where, typo, message):
    text = GCE.replace(where, where + typo + "\n") if where else GCE + typo + "\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: {message}"


def test_a_misspelled_table_is_named_as_such_not_as_missing_fields(tmp_path):
    path = write(tmp_path, MINIMAL.replace("[head]", "[haed]"))
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value) == f"{path}: [haed] is not a known table; did you mean [head]?"


def test_every_problem_is_reported_at_once_in_file_order(tmp_path):
    path = write(tmp_path, 'workers = 3\n' + MINIMAL.replace('[head]', 'idle_timout = 60\nspot = "yes"\n[head]')
                 + 'prot = 22\n[sssh]\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert str(e.value).splitlines() == [
        f"{path}: 5 problems, in file order:",
        "  1. at the top of the file, workers is outside any table; did you mean workers under [cluster]?",
        "  2. [cluster] idle_timout is not a known key; did you mean idle_timeout?",
        "  3. [cluster] spot = 'yes': must be true or false",
        "  4. [head] prot is not a known key; did you mean port?",
        "  5. [sssh] is not a known table; did you mean [ssh]?",
    ]


def test_the_provider_is_checked_before_provider_specific_fields(tmp_path):
    text = MINIMAL.replace('name = "demo"', 'name = "demo"\nmount_point = "mnt"\nprovider = "azure"')
    path = write(tmp_path, text + "[gce]\nzonez = []\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    lines = str(e.value).splitlines()
    assert lines[1] == "  1. [cluster] provider = 'azure': must be one of 'lab', 'gce', 'aws'", lines
    assert "mount_point" not in str(e.value), "no provider-specific problem before the provider is known"


def test_gce_needs_its_table_and_self_delete_needs_a_service_account(tmp_path):
    no_table = GCE[:GCE.index("[gce]")]
    path = write(tmp_path, no_table)
    with pytest.raises(ConfigError, match=r'\[cluster\] provider = "gce" needs a \[gce\] table'):
        load(path)
    delete = GCE.replace('provider = "gce"', 'provider = "gce"\nidle_action = "delete"')
    with pytest.raises(ConfigError, match=r'\[cluster\] idle_action = "delete": .*set \[gce\] service_account'):
        load(write(tmp_path, delete))
    ok = load(write(tmp_path, delete + 'service_account = "w@p.iam.gserviceaccount.com"\n'))
    assert (ok.idle_action, ok.settings.service_account) == ("delete", "w@p.iam.gserviceaccount.com")
    assert load(write(tmp_path, GCE)).idle_action == "stop", "stop is the default"


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="SPOTFAN_CONFIG"):
        load(tmp_path / "nope.toml")


def test_remote_paths_must_be_absolute_off_the_lab(tmp_path):
    text = MINIMAL.replace('name = "demo"', 'name = "demo"\nprovider = "gce"\nmount_point = "mnt"')
    with pytest.raises(ConfigError, match=r"\[cluster\] mount_point = 'mnt' must be an absolute path on the VMs"):
        load(write(tmp_path, text))
