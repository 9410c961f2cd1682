"""Collecting outputs into one table: content, key column, missing keys, unreadable outputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.collect import READERS, collect, write_table
from tasks.errors import CollectError
from tasks.spec import load_spec
from tests.conftest import run_cli

MODULE = """
    import json
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from tasks import filetask

    KEYS = [f"k{i:02d}" for i in range(12)]

    @filetask(keys=KEYS, out="vec/{key}.npy")
    def vec(key: str, out: Path) -> None:
        i = int(key[1:])
        if i == 7:
            raise ValueError("no vector for k07")
        np.save(out, np.array([i, i * 10, i * 100], dtype=np.float64))

    @filetask(keys=KEYS[:4], out="tab/{key}.parquet")
    def tab(key: str, out: Path) -> None:
        n = int(key[1:]) + 1
        pd.DataFrame({"row": range(n), "label": [key] * n}).to_parquet(out)

    @filetask(keys=KEYS[:3], out="js/{key}.json")
    def js(key: str, out: Path) -> None:
        out.write_text(json.dumps({"name": key, "score": int(key[1:]) / 2}))

    @filetask(keys=KEYS[:3], out="txt/{key}.txt")
    def txt(key: str, out: Path) -> None:
        out.write_text(key.upper())
"""


def summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def root(tmp_path: Path, write_module, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_module("t", MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # for the Python API; the CLI runs in tmp_path
    monkeypatch.delitem(sys.modules, "t", raising=False)
    return tmp_path


def test_collect_writes_every_output_with_its_key_and_counts_missing(root: Path) -> None:
    assert run_cli(["run", "t:vec", "--max-attempts", "1"], root).returncode == 1  # k07 fails
    proc = run_cli(["collect", "t:vec", "--to", "vec.parquet"], root)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc) | {"seconds": 0} == {
        "task": "vec", "to": str(root / "vec.parquet"), "format": "parquet", "rows": 11,
        "columns": 4, "outputs": 11, "missing": 1, "unreadable": 0, "seconds": 0}
    assert "1 of 12 keys are not done (no output yet) and are absent" in proc.stderr
    table = pd.read_parquet(root / "vec.parquet")
    assert list(table.columns) == ["key", "f0", "f1", "f2"]
    assert list(table["key"]) == [f"k{i:02d}" for i in range(12) if i != 7]
    row = table.set_index("key").loc["k05"]
    assert list(row) == [5.0, 50.0, 500.0]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]  # written by a rename


def test_collect_concatenates_frames_and_json_rows_and_writes_pickle(root: Path) -> None:
    assert run_cli(["run", "t:tab"], root).returncode == 0
    proc = run_cli(["collect", "t:tab", "--to", "tab.pkl"], root)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_pickle(root / "tab.pkl")
    assert len(table) == 1 + 2 + 3 + 4  # key kNN wrote NN+1 rows
    assert list(table.columns) == ["key", "row", "label"]
    assert (table["key"] == table["label"]).all()
    assert run_cli(["run", "t:js"], root).returncode == 0
    got = collect(load_spec("t:js"), root=root)
    assert got.frame.to_dict("records") == [
        {"key": "k00", "name": "k00", "score": 0.0}, {"key": "k01", "name": "k01", "score": 0.5},
        {"key": "k02", "name": "k02", "score": 1.0}]


def test_unreadable_outputs_are_all_listed_and_can_be_skipped(root: Path) -> None:
    assert run_cli(["run", "t:vec", "--max-attempts", "1"], root).returncode == 1
    (root / "vec/k03.npy").write_bytes(b"half a file")
    (root / "vec/k09.npy").write_bytes(np.lib.format.MAGIC_PREFIX + b"\x01\x00broken")
    proc = run_cli(["collect", "t:vec", "--to", "vec.parquet"], root)
    assert proc.returncode == 1
    assert "2 of 11 outputs of vec cannot be read:" in proc.stderr
    assert "'k03' (vec/k03.npy): ValueError: not a .npy file" in proc.stderr
    assert "'k09' (vec/k09.npy):" in proc.stderr
    assert "--skip-unreadable" in proc.stderr
    assert not (root / "vec.parquet").exists()
    proc = run_cli(["collect", "t:vec", "--to", "vec.parquet", "--skip-unreadable"], root)
    assert proc.returncode == 0, proc.stderr
    assert summary(proc)["unreadable"] == 2 and summary(proc)["rows"] == 9
    assert "skipped 2 unreadable output(s)" in proc.stderr and "'k09'" in proc.stderr
    assert set(pd.read_parquet(root / "vec.parquet")["key"]).isdisjoint({"k03", "k07", "k09"})


def test_other_outputs_need_a_reader(root: Path) -> None:
    assert run_cli(["run", "t:txt"], root).returncode == 0
    proc = run_cli(["collect", "t:txt", "--to", "txt.parquet"], root)
    assert proc.returncode == 2
    assert "no reader for '.txt' outputs of txt" in proc.stderr and "READERS" in proc.stderr
    task = load_spec("t:txt")
    got = collect(task, root=root, reader=lambda p: {"text": p.read_text()})
    assert got.frame.to_dict("records") == [{"key": f"k0{i}", "text": f"K0{i}"} for i in range(3)]
    READERS[".txt"] = lambda p: pd.DataFrame({"chars": list(p.read_text())})
    try:
        assert len(collect(task, root=root).frame) == 9
    finally:
        del READERS[".txt"]


def test_a_failed_write_keeps_the_previous_table(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    write_table(pd.DataFrame({"a": [1]}), target)
    mixed = pd.DataFrame({"a": [1, "x", 2.5]}, dtype=object)
    with pytest.raises(CollectError, match="--format pickle keeps any Python object"):
        write_table(mixed, target)
    assert pd.read_parquet(target)["a"].tolist() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    write_table(mixed, tmp_path / "out.pkl")
    assert pd.read_pickle(tmp_path / "out.pkl")["a"].tolist() == [1, "x", 2.5]
    (tmp_path / "keys.txt").write_text("a\n")
    proc = run_cli(["collect", "--cmd", "echo {key} > {out}", "--keys", "keys.txt", "--out",
                    "out/{key}.json", "--to", "table.csv"], tmp_path)
    assert proc.returncode == 2 and "CSV is not written" in proc.stderr
