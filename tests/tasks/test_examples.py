"""Each example end to end at a small size: prepare its inputs, run it, collect its outputs."""
from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, run_cli


def prepare(example: str, root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"examples.{example}", "prepare", "--root",
                           str(root), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run_and_collect(spec: list[str], root: Path, to: str, *extra: str) -> pd.DataFrame:
    """`python -m tasks run SPEC` then `collect SPEC --to`, from the repository root."""
    ran = run_cli(["run", *spec, "--root", str(root)], REPO)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout.splitlines()[-1])
    assert report["failed"] == 0 and report["left"] == 0
    got = run_cli(["collect", *spec, "--root", str(root), "--to", str(root / to), *extra], REPO)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["missing"] == 0
    return pd.read_parquet(root / to)


def test_images(tmp_path: Path) -> None:
    out = prepare("images", tmp_path, "--n", "60")
    assert "python -m tasks run examples.images:features" in out
    table = run_and_collect(["examples.images:features"], tmp_path, "features.parquet")
    assert table.shape == (60, 40)
    assert table["key"].iloc[0] == "img_00000.npy"
    hist = table[[f"f{i}" for i in range(8)]].to_numpy()
    assert np.allclose(hist.sum(axis=1), 1.0)  # the red channel's histogram sums to one
    assert table.iloc[:, 1:].std().gt(0).sum() > 30  # features differ between images


def test_weekly(tmp_path: Path) -> None:
    prepare("weekly", tmp_path, "--n", "20000")
    table = run_and_collect(["examples.weekly:weekly"], tmp_path, "weekly.parquet")
    assert table["key"].nunique() == 260
    assert (table["key"] == table["week"].dt.strftime("%Y-%m-%d")).all()
    events = pd.read_parquet(tmp_path / "events/events.parquet")
    assert table["events"].sum() == len(events)  # every event counted in exactly one week
    assert table["views"].add(table["carts"]).add(table["buys"]).eq(table["events"]).all()
    later = table[table["key"] > "2020-03-01"]
    assert later["days_since_prev"].notna().any() and (later["days_since_prev"].dropna() >= 0).all()


@pytest.mark.parametrize("model", ["numpy", "sklearn"])
def test_inference(tmp_path: Path, model: str) -> None:
    if model == "sklearn":
        pytest.importorskip("sklearn", reason="scikit-learn is optional: pip install -e '.[examples]'")
    out = prepare("inference", tmp_path, "--n", "8000", "--model", model)
    assert ("LogisticRegression" if model == "sklearn" else "NumpyLogit") in out
    table = run_and_collect(["examples.inference:predict"], tmp_path, "predictions.parquet")
    assert list(table.columns) == ["key", "passenger_id", "p_survived", "survived_pred", "device"]
    truth = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "shards").glob("*.parquet")))
    assert len(table) == len(truth) == 3000
    merged = table.merge(truth, on="passenger_id")
    assert (merged["survived_pred"] == merged["survived"]).mean() > 0.65  # it learned something
    assert table["p_survived"].between(0, 1).all()


def test_command_line_programs(tmp_path: Path) -> None:
    prepare("commands", tmp_path, "--n", "40")
    gz = ["--cmd", "gzip -c {src} > {out}", "--src", "logs/*.log", "--out", "gz/{name}.gz",
          "--name", "gzip-logs"]
    ran = run_cli(["run", *gz, "--root", str(tmp_path)], REPO)
    assert ran.returncode == 0, ran.stderr
    src = tmp_path / "logs/app-0007.log"
    assert gzip.decompress((tmp_path / "gz/app-0007.log.gz").read_bytes()) == src.read_bytes()
    sha = ["--cmd", "sha256sum < {src} > {out}", "--src", "logs/*.log", "--out",
           "sha256/{stem}.sha256", "--name", "sha256-logs"]
    table = run_and_collect(sha, tmp_path, "sums.parquet", "--reader",
                            "examples.commands:read_sha256")
    assert len(table) == 40
    row = table.set_index("key").loc["app-0007.log"]
    assert row["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
