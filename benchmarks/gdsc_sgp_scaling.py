"""Fit time and held-out accuracy of the sparse GP (``sgp``) against training-set size.

Usage (from the repository root)::

    python benchmarks/gdsc_sgp_scaling.py                       # 10k, 20k, 50k, 100k rows
    python benchmarks/gdsc_sgp_scaling.py --sizes 10000 --threads 1 --json sgp.json

GDSC1 and GDSC2 ln IC50 as two tasks (duplicated pairs averaged). The rows are permuted
with ``--seed``; the first ``--test`` rows are the held-out pairs and each training set
is the next ``n`` rows, so every size is scored on the same held-out rows. Cell
features: 50 principal components of expression fitted on the training cells of each
size; drug features: Morgan fingerprints of ../shared/data/drug_smiles.csv (radius 2,
1024 bits, RDKit), standardised on the training drugs. The model runs at its defaults
(``SparseGP()`` and its ``fit_defaults``) unless options say otherwise; the RMSE of the
per-task drug means of the training rows is shown as a floor. Fit times are the
wall-clock and the process CPU time of ``fit`` alone; on a shared machine the CPU time
(with ``--threads 1``) is the better measure of the work done.

Measured (seed 0, defaults: 2000 steps of 4096 rows, 128 cell-side inducing inputs, all
542 drugs exact on the drug side; one torch thread on a 2-core machine shared with other
jobs, load 5-7, hence wall times well above CPU times):

| training rows | fit CPU s | fit wall s | RMSE | NLL | 90% coverage | drug means RMSE |
|---|---|---|---|---|---|---|
| 10,000 | 169 | 514 | 1.3593 | 1.6627 | 0.907 | 1.4434 |
| 20,000 | 157 | 275 | 1.3334 | 1.6207 | 0.910 | 1.4234 |
| 50,000 | 154 | 292 | 1.2837 | 1.5743 | 0.918 | 1.4098 |
| 100,000 | 155 | 273 | 1.2585 | 1.5534 | 0.920 | 1.4044 |
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

from mtl4c_prob.data import load_responses, prepare_features
from mtl4c_prob.evaluation.metrics import evaluate
from mtl4c_prob.models import SparseGP

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 20_000, 50_000, 100_000])
    parser.add_argument("--test", type=int, default=10_000, help="held-out rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--n-inducing", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    data, _ = load_responses(
        [(args.data / "GDSC1_IC50.csv", "GDSC1"), (args.data / "GDSC2_IC50.csv", "GDSC2")],
        cell_features=args.data / "gdsc_expression.parquet",
        drug_features=args.data / "drug_smiles.csv",
    )
    order = np.random.default_rng(args.seed).permutation(data.n_obs)
    if args.test + max(args.sizes) > data.n_obs:
        raise SystemExit(f"only {data.n_obs} rows: --test plus the largest size is too many")
    test_rows = np.sort(order[: args.test])
    print(
        f"GDSC1+GDSC2 ln IC50: {data.n_obs} rows, {data.n_cells} cells, {data.n_drugs} drugs; "
        f"{args.test} held-out rows; torch threads {torch.get_num_threads()}",
        flush=True,
    )

    params = {} if args.n_inducing is None else {"n_inducing": args.n_inducing}
    fit = {} if args.steps is None else {"steps": args.steps}
    rows = []
    for n in args.sizes:
        train_rows = np.sort(order[args.test : args.test + n])
        train, test = prepare_features(data.subset(train_rows), data.subset(test_rows), cell_pca=50)
        model = SparseGP(**params)
        start, cpu = time.perf_counter(), time.process_time()
        model.fit(train, seed=args.seed, progress_bar=False, **fit)
        fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        pred = model.predict(test, seed=args.seed)
        predict_s = time.perf_counter() - start
        m = evaluate(
            test.y,
            pred["mean"].to_numpy(),
            pred["sd"].to_numpy(),
            lower=pred["lower"].to_numpy(),
            upper=pred["upper"].to_numpy(),
        )
        means = train.frame.groupby(["task", "drug"])["y"].mean()
        keys = pd.MultiIndex.from_frame(test.frame[["task", "drug"]])
        drug_mean = means.reindex(keys).fillna(train.frame["y"].mean()).to_numpy()
        rows.append(
            {
                "n_train": n,
                "drug_mean_rmse": float(np.sqrt(np.mean((test.y - drug_mean) ** 2))),
                "fit_s": round(fit_s, 1),
                "fit_cpu_s": round(fit_cpu_s, 1),
                "s_per_step": round(fit_s / model.fit_result_.steps, 4),
                "predict_s": round(predict_s, 1),
                "rmse": m["rmse"],
                "nll": m["nll"],
                "coverage_90": m["coverage_90"],
                "steps": model.fit_result_.steps,
                "batch_size": model.fit_result_.settings["batch_size"],
                "params": model.get_params(),
            }
        )
        print(
            f"  n={n}: fit {fit_s:.0f} s wall, {fit_cpu_s:.0f} s CPU, rmse {m['rmse']:.4f}, "
            f"nll {m['nll']:.4f}, coverage {m['coverage_90']:.3f}",
            flush=True,
        )

    table = pd.DataFrame(rows).drop(columns="params").set_index("n_train")
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
