"""Multitask GPs (ICM, LMC) against the same GP fitted per task, GDSC1 + GDSC2 ln IC50.

Usage (from the repository root)::

    python benchmarks/gdsc_mtgp.py                      # defaults below, about 8 min
    python benchmarks/gdsc_mtgp.py --max-train 0 --json mtgp.json    # all training rows

GDSC1 and GDSC2 ln IC50 are two tasks (duplicated pairs averaged). By default only the
drugs screened in both (122 names, the natural two-task problem: a drug's GDSC1 and
GDSC2 responses are what a multitask model can share) are kept. Split: leave cells out,
80/20 (``split(data, "lco", 0.2, seed)``, a test cell is unseen in both tasks). The
training rows are subsampled to ``--max-train`` (default 30,000 of about 166,000, a
seeded random subset, so each drug has about 120 training cells per task; the test rows
are all kept): with every training row each task alone pins its drugs' response patterns
and sharing them changes little (see benchmarks/README.md). Cell features: 50 principal
components of expression fitted on the training cells; drug features: Morgan
fingerprints (radius 2, 1024 bits, RDKit) reduced to ``--drug-pca`` principal components
on the training drugs, plus the one-hot drug identity (``drug_input="auto"``). Every GP
has the same settings (``--n-inducing``, ``--steps``, ``--batch-size``, lr); "per task"
is the same model with ``multitask=False`` (one GP per task, no shared drug effects or
task covariance). The drug-mean baseline predicts each task's training mean per drug
with its residual sd.
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
from mtl4c_prob.models import get_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEYS = ("rmse", "pearson", "coverage_90", "nll")


def drug_means(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Per task and drug: training mean and residual sd (task sd for unseen pairs)."""
    g = train.groupby(["task", "drug"])["y"]
    stats = pd.DataFrame({"mean": g.mean(), "sd": g.std()})
    out = test[["task", "cell", "drug", "y"]].join(stats, on=["task", "drug"])
    task_sd = train.groupby("task")["y"].std()
    out["mean"] = out["mean"].fillna(out["task"].map(train.groupby("task")["y"].mean()))
    out["sd"] = out["sd"].fillna(out["task"].map(task_sd))
    z = norm.ppf(0.95)
    out["lower"], out["upper"] = out["mean"] - z * out["sd"], out["mean"] + z * out["sd"]
    return out


def score(name: str, pred: pd.DataFrame, seconds: float, extra: dict) -> list[dict]:
    rows = []
    for task, part in pred.groupby("task"):
        m = evaluate(
            part["y"].to_numpy(),
            part["mean"].to_numpy(),
            part["sd"].to_numpy(),
            lower=part["lower"].to_numpy(),
            upper=part["upper"].to_numpy(),
        )
        rows.append({"model": name, "task": task, **{k: m[k] for k in KEYS}, "fit_s": seconds})
        rows[-1].update(extra)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--drugs", default="shared", choices=["shared", "all"])
    parser.add_argument(
        "--max-train", type=int, default=30000, help="subsample training rows (0: all)"
    )
    parser.add_argument("--drug-pca", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=["icm", "lmc"])
    parser.add_argument("--kernel", default="rbf")
    parser.add_argument("--composite", default="product")
    parser.add_argument("--n-inducing", type=int, default=96)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="rows per SVI step (0: the model's default, 2048 per task in a joint fit)",
    )
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--objective", default="elbo", choices=["predictive", "elbo"])
    parser.add_argument("--no-single", action="store_true", help="skip the per-task fits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    start_all = time.perf_counter()

    data, _ = load_responses(
        [(args.data / "GDSC1_IC50.csv", "GDSC1"), (args.data / "GDSC2_IC50.csv", "GDSC2")],
        cell_features=args.data / "gdsc_expression.parquet",
        drug_features=args.data / "drug_smiles.csv",
    )
    frame = data.frame
    if args.drugs == "shared":
        per_task = frame.groupby("drug")["task"].nunique()
        keep = frame["drug"].isin(per_task.index[per_task == data.n_tasks])
        data = data.subset(np.flatnonzero(keep.to_numpy()))
    train, test = split(data, "lco", 0.2, seed=args.seed)
    if args.max_train and train.n_obs > args.max_train:
        rows = np.random.default_rng(args.seed).choice(train.n_obs, args.max_train, replace=False)
        train = train.subset(np.sort(rows))
    train, test = prepare_features(train, test, cell_pca=50, drug_pca=args.drug_pca)
    tr, te = train.frame, test.frame
    setting = (
        f"GDSC1+GDSC2 ln IC50, {args.drugs} drugs ({tr['drug'].nunique()}), leave cells out "
        f"seed {args.seed}: {len(tr)} train rows ({tr['cell'].nunique()} cells; "
        f"{dict(tr.groupby('task').size())}), {len(te)} test rows "
        f"({te['cell'].nunique()} cells){'; training rows subsampled' if args.max_train else ''}"
    )
    gp_setting = (
        f"GP settings: kernel={args.kernel} composite={args.composite} n_inducing="
        f"{args.n_inducing} objective={args.objective}; {args.steps} SVI steps, batch "
        f"{args.batch_size or 'of the model default'}, lr {args.lr}; 50 expression PCs, "
        f"{args.drug_pca} fingerprint PCs + drug identity; torch threads {torch.get_num_threads()}"
    )
    print(setting, "\n" + gp_setting, flush=True)

    start = time.perf_counter()
    rows = score("drug means", drug_means(tr, te), time.perf_counter() - start, {})
    fit = {
        "steps": args.steps,
        "batch_size": args.batch_size or None,
        "lr": args.lr,
        "seed": args.seed,
        "progress_bar": False,
    }
    variants = [(name, True) for name in args.models]
    if not args.no_single:
        variants += [(name, False) for name in args.models]
    for name, multitask in variants:
        label = f"{name} {'multitask' if multitask else 'per task'}"
        params = {
            "kernel": args.kernel,
            "composite": args.composite,
            "n_inducing": args.n_inducing,
            "objective": args.objective,
            "multitask": multitask,
        }
        model = get_model(name, **params)
        start = time.perf_counter()
        model.fit(train, **fit)
        seconds = time.perf_counter() - start
        pred = model.predict(test, seed=args.seed, num_samples=100)
        extra = {}
        if multitask:
            extra["correlation"] = float(model.task_correlation().iat[0, 1])
        rows += score(label, pred, seconds, extra)
        summary = ", ".join(
            f"{r['task']} rmse {r['rmse']:.3f} nll {r['nll']:.3f} cov {r['coverage_90']:.3f}"
            for r in rows[-2:]
        )
        corr = f"; GDSC1-GDSC2 correlation {extra['correlation']:.3f}" if extra else ""
        print(f"  {label}: {summary} ({seconds:.0f} s){corr}", flush=True)

    table = pd.DataFrame(rows).set_index(["model", "task"])
    with pd.option_context(
        "display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4f}".format
    ):
        print(table)
    total = time.perf_counter() - start_all
    print(f"total {total:.0f} s")
    if args.json:
        out = {"setting": setting, "gp_setting": gp_setting, "total_s": total, "rows": rows}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
