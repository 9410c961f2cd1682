"""Runnable examples of spotfan's task engine; each generates its own inputs (no downloads).

    images     numpy features of a few thousand generated images (.npy -> .npy)
    weekly     260 weekly feature tables from one generated event log (pandas -> Parquet)
    inference  a small model trained once, loaded once per process by init=, predicting
               over shards of a generated Titanic-style table (Parquet -> Parquet)
    commands   inputs for unmodified command-line programs run via --cmd (gzip, sha256sum),
               and a reader that collects sha256sum's outputs

Each: `python -m examples.NAME prepare --root DIR [--n N]`, then the `python -m tasks run`
line that `prepare` prints. Run from the repository root, so `examples` can be imported.
"""
