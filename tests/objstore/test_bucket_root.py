"""BucketRoot on its own: input globs over object names, as glob_sources matches files."""
from __future__ import annotations

import pytest

from tasks.errors import UnsafePath
from tasks.store.root import BucketRoot

NAMES = ["in/a.txt", "in/b.csv", "in/.hidden.txt", "in/sub/c.txt", "in/sub/deep/d.txt", "in/.git/e.txt",
         "in/folder/", "other/f.txt", ".spotfan/tasks/t/plan.json"]


@pytest.fixture
def root(backend) -> BucketRoot:
    for name in NAMES:
        backend.seed(f"runs/g/{name}", b"x")
    return BucketRoot(f"{backend.scheme}://{backend.bucket_name}/runs/g", bucket=backend.new())


@pytest.mark.parametrize("pattern, files", [
    ("in/*.txt", ["in/a.txt"]),
    ("in/.*.txt", ["in/.hidden.txt"]),
    ("in/**/*.txt", ["in/a.txt", "in/sub/c.txt", "in/sub/deep/d.txt"]),
    ("**/*.txt", ["in/a.txt", "in/sub/c.txt", "in/sub/deep/d.txt", "other/f.txt"]),
    ("in/?.csv", ["in/b.csv"]),
    ("in/[ab].*", ["in/a.txt", "in/b.csv"]),
    ("in/sub/*", ["in/sub/c.txt"]),
])
def test_a_glob_matches_object_names_as_it_matches_files(root: BucketRoot, pattern: str, files: list[str]) -> None:
    assert root.glob(pattern).files == files


def test_folders_a_glob_matches_are_counted_not_inputs(root: BucketRoot) -> None:
    found = root.glob("in/*")
    assert found.files == ["in/a.txt", "in/b.csv"]
    found = root.glob("in/s*")
    assert (found.files, found.folders) == ([], 1)


def test_a_glob_out_of_the_root_is_refused(root: BucketRoot) -> None:
    with pytest.raises(UnsafePath):
        root.glob("../elsewhere/*.txt")
