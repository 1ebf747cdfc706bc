"""Every registered model next to scikit-surprise's SVD, NMF and KNNBaseline on GDSC2.

Usage (from the repository root)::

    python benchmarks/gdsc_zoo.py --split lpo
    python benchmarks/gdsc_zoo.py --split lco            # 50 expression PCs, fingerprints
    python benchmarks/gdsc_zoo.py --split lpo --models mf nmf knn

GDSC2 ln IC50, duplicated pairs averaged, 80/20 split. Cell features: 50 principal
components of expression fitted on training cells; drug features: Morgan fingerprints of
../shared/data/drug_smiles.csv (radius 2, 1024 bits, through RDKit), drugs without
SMILES flagged by the ``no_structure`` column. Drug fingerprints go only to the models that
need drug features (``ffnn``, ``ncf-features``); cell features go to those on LPO and to
every model on LCO (the other models cannot predict a new cell without them). Giving the
Bayesian MF fingerprints as well costs it on LCO (RMSE 1.29 instead of 1.25): every drug
is seen, and 1,025 extra loadings per factor only add noise. Point predictors (surprise)
get a Gaussian predictive whose sd is their training residual sd. Each model runs at its own default
fit settings (``fit_defaults``), one after the other in this process.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm

from mtl4c_prob.data import load_responses, prepare_features, split
from mtl4c_prob.evaluation.metrics import evaluate
from mtl4c_prob.models import MODELS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FEATURE_MODELS = {"ffnn", "ncf-features"}


def surprise_rows(train: pd.DataFrame, test: pd.DataFrame, seed: int) -> list[dict]:
    try:
        import surprise
    except ImportError:
        print("scikit-surprise not installed: surprise baselines skipped")
        return []
    lo, hi = train["y"].min(), train["y"].max()
    reader = surprise.Reader(rating_scale=(lo, hi))
    trainset = surprise.Dataset.load_from_df(
        train[["cell", "drug", "y"]], reader
    ).build_full_trainset()
    algos = {
        "surprise SVD": surprise.SVD(random_state=seed),
        "surprise NMF": surprise.NMF(random_state=seed),
        "surprise KNNBaseline": surprise.KNNBaseline(
            sim_options={"name": "pearson_baseline", "user_based": False}, verbose=False
        ),
    }
    rows = []
    for name, algo in algos.items():
        start = time.perf_counter()
        algo.fit(trainset)
        seconds = time.perf_counter() - start

        def estimate(frame, algo=algo):
            pairs = zip(frame["cell"], frame["drug"], strict=True)
            return np.array([algo.predict(c, d).est for c, d in pairs])

        sd = np.sqrt(np.mean((train["y"].to_numpy() - estimate(train)) ** 2))
        mean = estimate(test)
        z = norm.ppf(0.95)
        lower, upper = mean - z * sd, mean + z * sd
        rows.append(summary(name, test, mean, np.full(len(test), sd), lower, upper, seconds))
    return rows


def summary(name, test, mean, sd, lower, upper, seconds) -> dict:
    m = evaluate(
        test["y"].to_numpy(), mean, sd, lower=lower, upper=upper, drug=test["drug"].to_numpy()
    )
    keys = ("rmse", "pearson", "per_drug_pearson", "coverage_90", "nll", "crps")
    return {"model": name, **{k: m[k] for k in keys}, "fit_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="lpo", choices=["lpo", "lco"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--models", nargs="*", default=None, help="default: all registered")
    parser.add_argument("--no-surprise", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    data, _ = load_responses(
        [(args.data / "GDSC2_IC50.csv", "GDSC2")],
        cell_features=args.data / "gdsc_expression.parquet",
        drug_features=args.data / "drug_smiles.csv",
    )
    train_f, test_f = split(data, args.split, 0.2, seed=args.seed)
    train_f, test_f = prepare_features(train_f, test_f, cell_pca=50)
    bare = data.with_features()
    bare.cell_features = bare.drug_features = None
    train_b, test_b = split(bare, args.split, 0.2, seed=args.seed)
    cells_only = data.with_features()
    cells_only.drug_features = None
    train_c, test_c = split(cells_only, args.split, 0.2, seed=args.seed)
    train_c, test_c = prepare_features(train_c, test_c, cell_pca=50)
    tr, te = train_f.frame, test_f.frame
    print(f"GDSC2 {args.split} seed {args.seed}: {len(tr)} train, {len(te)} test pairs")

    rows = [] if args.no_surprise else surprise_rows(tr, te, args.seed)
    for name in args.models or list(MODELS):
        if name in FEATURE_MODELS:
            train, test = train_f, test_f
        elif args.split == "lco":
            train, test = train_c, test_c
        else:
            train, test = train_b, test_b
        model = MODELS[name]()
        start = time.perf_counter()
        model.fit(train, seed=args.seed, progress_bar=False)
        seconds = time.perf_counter() - start
        pred = model.predict(test, seed=args.seed)
        rows.append(
            summary(
                name,
                test.frame,
                pred["mean"].to_numpy(),
                pred["sd"].to_numpy(),
                pred["lower"].to_numpy(),
                pred["upper"].to_numpy(),
                seconds,
            )
        )
        print(
            f"  {name}: rmse {rows[-1]['rmse']:.4f} coverage {rows[-1]['coverage_90']:.3f} "
            f"({seconds:.0f} s)",
            flush=True,
        )

    table = pd.DataFrame(rows).set_index("model")
    with pd.option_context(
        "display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
