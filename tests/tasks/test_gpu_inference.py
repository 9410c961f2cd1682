"""The batch-inference example as a GPU VM's agent runs it (`--gpus N`): one worker process per GPU, each
loading the model once in init=, and on a machine without a GPU (or without PyTorch) the model stays
on the CPU and every shard is still predicted, once."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, run_cli

SHARDS = 4


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="PyTorch is installed: it may see a GPU")
def test_with_gpus_asked_for_and_none_there_the_model_runs_on_the_cpu(tmp_path: Path) -> None:
    prep = subprocess.run([sys.executable, "-m", "examples.inference", "prepare", "--root", str(tmp_path),
                           "--n", str(5000 + SHARDS * 1000), "--model", "numpy"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert prep.returncode == 0, prep.stderr
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    ran = run_cli(["run", "examples.inference:predict", "--root", str(tmp_path), "--gpus", "2"], REPO, env=env)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout.splitlines()[-1])
    assert report["failed"] == 0 and report["left"] == 0
    outs = sorted((tmp_path / "predictions").glob("*.parquet"))
    assert [p.stem for p in outs] == [f"part-{i:05d}" for i in range(SHARDS)]  # one output per shard
    table = pd.concat(pd.read_parquet(p) for p in outs)
    assert len(table) == SHARDS * 1000 and set(table["device"]) == {"cpu"}
    assert table["p_survived"].between(0, 1).all()
