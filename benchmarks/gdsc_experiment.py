"""An experiment of three models x three seeded runs on GDSC2 leave-pairs-out, timed.

Usage (from the repository root)::

    python benchmarks/gdsc_experiment.py [--workers 2] [--runs 3] [--out DIR] [--json FILE]

The models (mean effects, Bayesian MF, neighbourhood model) run at their own fit defaults
on three fresh 80/20 leave-pairs-out splits of GDSC2 ln IC50 (duplicated pairs
averaged). The script prints the wall time of the whole experiment (loading, fits,
predictions, results table and report), the ranking on held-out NLL with the paired
test over runs, and the mean of each metric; ``report.html`` is in the output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

from mtl4c_prob.experiment import Experiment

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = ("mean", "mf", "knn")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="gdsc-experiment-"))
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} cores; outputs in {out}")

    dataset = {"files": [str(args.data / "GDSC2_IC50.csv")], "tasks": ["GDSC2"], "split": "lpo"}
    exp = Experiment(
        "gdsc2-three-models",
        {"GDSC2": dataset},
        list(MODELS),
        out,
        runs=args.runs,
        seed=args.seed,
        device="cpu",
    )
    start = time.perf_counter()
    results = exp.run(workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"{len(MODELS)} models x {args.runs} runs, {args.workers} workers: {seconds:.0f} s")

    ranking = exp.ranking("GDSC2")
    overall = results[results["scope"] == "overall"]
    metrics = ["rmse", "pearson", "nll", "crps", "coverage_90", "calibration_error", "fit_seconds"]
    table = overall.pivot_table(index="model", columns="metric", values="value")[metrics]
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(ranking)
        print(table.loc[ranking.index])
    if args.json:
        document = {
            "seconds": seconds,
            "workers": args.workers,
            "runs": args.runs,
            "load_start": load,
            "load_end": os.getloadavg()[0],
            "ranking": ranking.reset_index().to_dict(orient="records"),
            "means": table.reset_index().to_dict(orient="records"),
        }
        args.json.write_text(json.dumps(document, indent=1, default=float))


if __name__ == "__main__":
    main()
