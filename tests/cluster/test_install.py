"""A plain, non-editable install of spotfan (a wheel, into a fresh venv) holds everything a VM needs,
and its `spotfan` command brings up a lab cluster and runs a task there, far from any checkout.

To stay fast, the fresh venv gets its dependencies from this test venv's site-packages
(one .pth line; no download) and spotfan itself only from the wheel built here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from labs import REPO

BUILD_TIMEOUT_S = 300  # a wheel build fetches setuptools into its isolated build env (pip's cache)
CMD_TIMEOUT_S = 180
SOURCES = ("pyproject.toml", "README.md", "cluster", "tasks", "examples")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with spotfan installed from a wheel (no -e); returns its folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building must leave the checkout as it is
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("spotfan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("examples/")], "no top-level examples package in the wheel"
    for script in ("boot.sh", "mount.sh", "spot_notice.sh", "watchdog.sh"):
        assert f"cluster/vm/{script}" in names
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=CMD_TIMEOUT_S)
    fresh = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies only (spotfan itself is editable there: a .pth inside a plain path is never read).
    (fresh / "deps-from-the-test-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    got = subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    assert got.returncode == 0, got.stdout + got.stderr
    return venv


def in_venv(venv: Path, code: str, cwd: Path) -> str:
    r = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, capture_output=True, text=True,
                       timeout=CMD_TIMEOUT_S, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_wheel_holds_the_vm_scripts_and_imports_no_cloud_sdk(installed: Path, tmp_path: Path) -> None:
    said = in_venv(installed, (
        "import sys, importlib.resources as r, cluster, cluster.cli, cluster.config, cluster.providers\n"
        "print(cluster.__file__)\n"
        "print(sorted(p.name for p in r.files('cluster.vm').iterdir() if p.name.endswith('.sh')))\n"
        "print(any(m.startswith('google') for m in sys.modules))\n"
        "print(any(m.startswith(('boto3', 'botocore')) for m in sys.modules))\n"), cwd=tmp_path)
    where, scripts, google, boto = said.splitlines()
    assert where.startswith(str(installed)), f"spotfan imported from {where}, not from the fresh install"
    assert scripts == "['boot.sh', 'mount.sh', 'spot_notice.sh', 'watchdog.sh']"
    assert google == "False", "the Compute SDK is imported only when the GCE provider is used"
    assert boto == "False", "boto3 is imported only when the AWS provider is used"
    assert (installed / "bin" / "spotfan").exists()


def test_spotfan_up_and_run_on_the_lab_from_the_install(installed: Path, make_lab, tmp_path: Path) -> None:
    python = installed / "bin" / "python"
    lab = make_lab(workers=1, python=str(python), python_path=())  # the VMs use the install, no checkout
    (lab.share / "in").mkdir(parents=True)
    for name in ("a.txt", "b.txt"):
        (lab.share / "in" / name).write_text(name)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}

    def spotfan(*args: str) -> str:
        r = subprocess.run([str(installed / "bin" / "spotfan"), *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=CMD_TIMEOUT_S, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"spotfan {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    up = spotfan("up")
    assert "==> up: 1 VMs working" in up and "agent: ok" in up, up
    vm = lab.config.vm_names()[0]
    agents = [" ".join(p.cmdline()) for p in lab.provider.processes(vm) if "-m cluster.vm.agent" in " ".join(p.cmdline())]
    assert agents and all(a.startswith(str(python)) for a in agents), agents
    done = spotfan("run", "cp {src} {out}", "--src", "in/*", "--out", "out/{name}", "--wait", "--wait-timeout", "120")
    assert "done (2/2 done, 0 failed)" in done, done
    assert sorted(p.name for p in (lab.share / "out").iterdir()) == ["a.txt", "b.txt"]
    spotfan("down")
    assert lab.statuses() == {}
