"""Bayesian MF next to scikit-surprise's SVD and the additive baseline on GDSC2 ln IC50.

Usage (from the repository root)::

    python benchmarks/gdsc_mf.py --split lpo            # leave pairs out, 80/20
    python benchmarks/gdsc_mf.py --split lco --cell-pca 50

Duplicated (cell, drug) rows are averaged. For each model the script prints RMSE, Pearson,
90% coverage, NLL, CRPS, fit seconds and the process's peak resident memory so far.
Point predictors (surprise SVD, the additive baseline) get a Gaussian predictive whose sd
is their training residual sd (per drug for the baseline), so their NLL and coverage are
comparable. scikit-surprise is optional (``pip install scikit-surprise``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mtl4c_prob.data import load_responses, prepare_features, split
from mtl4c_prob.evaluation.metrics import evaluate
from mtl4c_prob.models import BayesianMF

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def additive_baseline(train: pd.DataFrame, test: pd.DataFrame, reg: float = 5.0):
    """y = mu + b_cell + b_drug by ridge-regularised alternating updates; sd per drug."""
    mu = train["y"].mean()
    b_cell = pd.Series(0.0, index=train["cell"].unique())
    b_drug = pd.Series(0.0, index=train["drug"].unique())
    for _ in range(10):
        r = train["y"] - mu - train["cell"].map(b_cell).to_numpy()
        g = r.groupby(train["drug"])
        b_drug = g.sum() / (g.count() + reg)
        r = train["y"] - mu - train["drug"].map(b_drug).to_numpy()
        g = r.groupby(train["cell"])
        b_cell = g.sum() / (g.count() + reg)
    fitted = mu + train["cell"].map(b_cell).to_numpy() + train["drug"].map(b_drug).to_numpy()
    resid = (train["y"] - fitted).groupby(train["drug"]).std()
    mean = (
        mu
        + test["cell"].map(b_cell).fillna(0).to_numpy()
        + test["drug"].map(b_drug).fillna(0).to_numpy()
    )
    sd = test["drug"].map(resid).fillna(resid.median()).to_numpy()
    return mean, sd


def surprise_svd(train: pd.DataFrame, test: pd.DataFrame, seed: int):
    from surprise import SVD, Dataset, Reader

    lo, hi = train["y"].min(), train["y"].max()
    reader = Reader(rating_scale=(lo, hi))
    trainset = Dataset.load_from_df(train[["cell", "drug", "y"]], reader).build_full_trainset()
    algo = SVD(random_state=seed)
    algo.fit(trainset)

    def estimate(frame):
        pairs = zip(frame["cell"], frame["drug"], strict=True)
        return np.array([algo.predict(c, d).est for c, d in pairs])

    fitted, mean = estimate(train), estimate(test)
    sd = np.full(len(test), np.sqrt(np.mean((train["y"].to_numpy() - fitted) ** 2)))
    return mean, sd


def row(name, y, mean, sd, drug, seconds):
    from scipy.stats import norm

    z = norm.ppf(0.95)
    m = evaluate(y, mean, sd, lower=mean - z * sd, upper=mean + z * sd, drug=drug)
    return {
        "model": name,
        "rmse": m["rmse"],
        "pearson": m["pearson"],
        "coverage_90": m["coverage_90"],
        "nll": m["nll"],
        "crps": m["crps"],
        "fit_s": seconds,
        "peak_mb": peak_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="lpo", choices=["lpo", "lco"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cell-pca", type=int, default=50)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    features = args.data / "gdsc_expression.parquet" if args.split == "lco" else None
    data, _ = load_responses([(args.data / "GDSC2_IC50.csv", "GDSC2")], cell_features=features)
    train, test = split(data, args.split, 0.2, seed=args.seed)
    if features is not None:
        train, test = prepare_features(train, test, cell_pca=args.cell_pca)
    tr, te = train.frame, test.frame
    y, drug = te["y"].to_numpy(), te["drug"].to_numpy()
    print(f"GDSC2 {args.split} seed {args.seed}: {len(tr)} train, {len(te)} test pairs")

    rows = []
    start = time.perf_counter()
    mean, sd = additive_baseline(tr, te)
    rows.append(row("additive baseline", y, mean, sd, drug, time.perf_counter() - start))
    try:
        start = time.perf_counter()
        mean, sd = surprise_svd(tr, te, args.seed)
        rows.append(row("surprise SVD", y, mean, sd, drug, time.perf_counter() - start))
    except ImportError:
        print("scikit-surprise not installed: SVD skipped")

    defaults = {"lpo": (50, 1000, 0.05), "lco": (50, 1000, 0.05)}[args.split]
    rank = args.rank or defaults[0]
    steps = args.steps or defaults[1]
    lr = args.lr or defaults[2]
    model = BayesianMF(rank=rank)
    start = time.perf_counter()
    model.fit(train, steps=steps, lr=lr, seed=args.seed, progress_bar=False)
    seconds = time.perf_counter() - start
    pred = model.predict(test, num_samples=300, seed=args.seed)
    name = f"Bayesian MF (rank {rank}, {steps} steps)"
    r = row(name, y, pred["mean"].to_numpy(), pred["sd"].to_numpy(), drug, seconds)
    # The model's own intervals are mixture quantiles, not mean +/- z sd.
    r["coverage_90"] = float(np.mean((pred["lower"] <= y) & (y <= pred["upper"])))
    rows.append(r)

    table = pd.DataFrame(rows).set_index("model")
    with pd.option_context(
        "display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
