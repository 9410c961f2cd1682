"""Batch inference: a small model trained once, loaded once per worker process by `init=` and put
on that process's GPU (the CPU when there is none), predicting over shards of a generated
Titanic-style passenger table, one output per shard.

    python -m examples.inference prepare --root DIR [--n 50000] [--model auto|sklearn|numpy]
    python -m tasks run examples.inference:predict --root DIR [--gpus N]
    python -m tasks collect examples.inference:predict --root DIR --to predictions.parquet

With `--gpus N` (what a GPU VM's agent passes) each worker process sees its own GPU as
`cuda` (CUDA_VISIBLE_DEVICES, set before `init=` runs); `init=` moves the model's weights
there with PyTorch when PyTorch is installed and sees a GPU, else keeps them on the CPU in
numpy. Each output says which device predicted it.

`prepare` generates labeled passengers (class, sex, age, siblings, parents, fare, port),
trains a logistic regression on the first TRAIN_ROWS, saves it to ROOT/model/model.pkl
and writes the other passengers as Parquet shards of SHARD_ROWS under ROOT/shards/.
The model is scikit-learn's (`pip install -e '.[examples]'`); without scikit-learn, or
with --model numpy, a small numpy logistic regression stands in, so the example runs
either way.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks import filetask

DEFAULT_N = 50_000  # passengers made by `prepare`, training rows included
TRAIN_ROWS = 5_000
SHARD_ROWS = 1_000
MODEL = Path("model") / "model.pkl"  # relative to the run root: workers run there
PORTS = ("C", "Q", "S")
NUMPY_STEPS = 300  # gradient steps of the numpy stand-in
NUMPY_LEARNING_RATE = 0.5


def design(df: pd.DataFrame) -> np.ndarray:
    """The model's inputs from a passenger table: numbers, scaled, and one-hot columns."""
    cols = [
        (df["pclass"] == 1), (df["pclass"] == 2),
        (df["sex"] == "female"),
        df["age"].fillna(30.0) / 80.0, df["age"].isna(),
        df["sibsp"] / 8.0, df["parch"] / 6.0,
        np.log1p(df["fare"]) / 6.0,
        *[(df["embarked"] == p) for p in PORTS[:-1]],
    ]
    return np.column_stack([np.asarray(c, dtype=np.float64) for c in cols])


class NumpyLogit:
    """Logistic regression by gradient descent: the stand-in when scikit-learn is missing."""

    def __init__(self) -> None:
        self.w: np.ndarray | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> "NumpyLogit":
        xb = np.column_stack([x, np.ones(len(x))])
        w = np.zeros(xb.shape[1])
        for _ in range(NUMPY_STEPS):
            p = 1.0 / (1.0 + np.exp(-xb @ w))
            w -= NUMPY_LEARNING_RATE * xb.T @ (p - y) / len(y)
        self.w = w
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        assert self.w is not None, "fit the model first"
        p = 1.0 / (1.0 + np.exp(-(np.column_stack([x, np.ones(len(x))]) @ self.w)))
        return np.column_stack([1 - p, p])


class Placed:
    """A logistic regression's weights on one device: a GPU through PyTorch, or the CPU in numpy."""

    def __init__(self, coef: np.ndarray, intercept: float, *, torch: Any = None) -> None:
        self.torch = torch  # the torch module when on the GPU; None on the CPU
        self.device = "cuda:0" if torch is not None else "cpu"  # cuda:0 is this process's own GPU
        if torch is None:
            self.coef, self.intercept = coef, intercept
        else:
            self.coef = torch.as_tensor(coef, dtype=torch.float32, device=self.device)
            self.intercept = torch.as_tensor(intercept, dtype=torch.float32, device=self.device)

    def p_survived(self, x: np.ndarray) -> np.ndarray:
        if self.torch is None:
            return np.asarray(1.0 / (1.0 + np.exp(-(x @ self.coef + self.intercept))))
        t = self.torch
        with t.no_grad():
            xs = t.as_tensor(x, dtype=t.float32, device=self.device)
            return np.asarray(t.sigmoid(xs @ self.coef + self.intercept).cpu().numpy())


def gpu_torch() -> Any:
    """PyTorch when it is installed and sees a GPU (this worker process's, by CUDA_VISIBLE_DEVICES);
    None otherwise: the model then stays on the CPU."""
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def weights(fitted: Any) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) of scikit-learn's LogisticRegression or of the numpy stand-in."""
    if isinstance(fitted, NumpyLogit):
        assert fitted.w is not None, "fit the model first"
        return fitted.w[:-1], float(fitted.w[-1])
    return np.asarray(fitted.coef_[0], dtype=np.float64), float(fitted.intercept_[0])


def load_model() -> Placed:
    """init=: runs once per worker process, after its CUDA_VISIBLE_DEVICES is set; the model it
    returns, on that process's GPU or the CPU, is every call's ctx."""
    with open(MODEL, "rb") as f:
        fitted = pickle.load(f)
    coef, intercept = weights(fitted)
    return Placed(coef, intercept, torch=gpu_torch())


@filetask(src="shards/*.parquet", out="predictions/{stem}.parquet", init=load_model)
def predict(src: Path, out: Path, ctx: Placed) -> None:
    shard = pd.read_parquet(src)
    p = ctx.p_survived(design(shard))
    pd.DataFrame({"passenger_id": shard["passenger_id"], "p_survived": p.astype(np.float32),
                  "survived_pred": (p >= 0.5).astype(np.int8),
                  "device": pd.Categorical([ctx.device] * len(shard))}).to_parquet(out, index=False)


def passengers(n: int, *, seed: int = 0) -> pd.DataFrame:
    """`n` Titanic-style passengers with a `survived` label drawn from a known rule."""
    rng = np.random.default_rng(seed)
    pclass = rng.choice([1, 2, 3], n, p=[0.24, 0.21, 0.55])
    female = rng.random(n) < 0.35
    age = np.clip(rng.normal(30, 14, n), 0.5, 80).round(1)
    age_missing = rng.random(n) < 0.2
    sibsp = rng.poisson(0.5, n)
    parch = rng.poisson(0.4, n)
    fare = np.round(rng.lognormal(np.array([4.2, 3.0, 2.3])[pclass - 1], 0.6), 2)
    embarked = rng.choice(list(PORTS), n, p=[0.19, 0.09, 0.72])
    logit = 0.4 + 2.5 * female - 0.9 * (pclass - 1) - 0.025 * (age - 30) - 0.3 * sibsp
    survived = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    return pd.DataFrame({
        "passenger_id": np.arange(1, n + 1), "pclass": pclass,
        "sex": np.where(female, "female", "male"), "age": np.where(age_missing, np.nan, age),
        "sibsp": sibsp, "parch": parch, "fare": fare, "embarked": embarked,
        "survived": survived})


def train(df: pd.DataFrame, *, kind: str = "auto") -> Any:
    """A fitted classifier: scikit-learn's logistic regression, or the numpy stand-in."""
    x, y = design(df), df["survived"].to_numpy()
    if kind in ("auto", "sklearn"):
        try:
            from sklearn.linear_model import LogisticRegression
        except ImportError:
            if kind == "sklearn":
                raise SystemExit("scikit-learn is not installed: pip install -e '.[examples]' "
                                 "(or use --model numpy)") from None
        else:
            return LogisticRegression(max_iter=1000).fit(x, y)
    return NumpyLogit().fit(x, y)


def prepare(root: str | Path, *, n: int = DEFAULT_N, model: str = "auto", seed: int = 0) -> Any:
    """Train and save the model, write the shards to predict. Returns the model."""
    root = Path(root)
    df = passengers(max(n, TRAIN_ROWS + 1), seed=seed)
    fitted = train(df.iloc[:TRAIN_ROWS], kind=model)
    (root / MODEL).parent.mkdir(parents=True, exist_ok=True)
    tmp = (root / MODEL).with_name(".model.pkl")
    with open(tmp, "wb") as f:
        pickle.dump(fitted, f)
    tmp.rename(root / MODEL)
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    rest = df.iloc[TRAIN_ROWS:]
    for i, start in enumerate(range(0, len(rest), SHARD_ROWS)):
        path = shards / f"part-{i:05d}.parquet"
        rest.iloc[start:start + SHARD_ROWS].to_parquet(path.with_name(f".{path.name}"), index=False)
        path.with_name(f".{path.name}").rename(path)
    return fitted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--root", required=True, help="run root to write model/ and shards/ into")
    parser.add_argument("--n", type=int, default=DEFAULT_N,
                        help=f"passengers, training rows included (default {DEFAULT_N})")
    parser.add_argument("--model", choices=["auto", "sklearn", "numpy"], default="auto",
                        help="auto: scikit-learn if installed, else the numpy stand-in")
    args = parser.parse_args(argv)
    fitted = prepare(args.root, n=args.n, model=args.model)
    print(f"trained {type(fitted).__name__} on "
          f"{TRAIN_ROWS} passengers, saved to {args.root}/{MODEL}; wrote shards of "
          f"{SHARD_ROWS} under {args.root}/shards; next:\n"
          f"  python -m tasks run examples.inference:predict --root {args.root}\n"
          f"  python -m tasks collect examples.inference:predict --root {args.root} "
          "--to predictions.parquet")
    return 0


if __name__ == "__main__":
    # Run as `python -m examples.inference`, this file is `__main__`; a NumpyLogit pickled
    # from here could not be unpickled by the workers. Run the importable module instead.
    from examples.inference import main as importable_main

    sys.exit(importable_main())
