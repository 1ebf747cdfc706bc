"""Tune the Bayesian MF's priors on GDSC2 leave-pairs-out; one worker against two.

Usage (from the repository root)::

    python benchmarks/gdsc_tuning.py [--trials 20] [--seed 0] [--priors-only] [--json FILE]

Steps, each on the same 80/20 leave-pairs-out split (duplicated pairs averaged):

1. fit the MF at its defaults on the training part, score the test part;
2. a study of ``--trials`` trials (one worker, one torch thread) tunes the priors, rank,
   noise model, learning rate and steps (``--priors-only``: the prior scales and the noise
   model, at rank 50 and the default fit) on a validation split of the training part
   (held-out NLL, median pruning);
3. refit the best configuration on the whole training part, score the test part;
4. the same study (same seed, fresh storage) with two worker processes, one torch thread
   each: the wall-time ratio of two workers to one.
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

import optuna
import torch

from mtl4c_prob.data import load_responses, split
from mtl4c_prob.evaluation.metrics import evaluate_frame
from mtl4c_prob.models import get_model
from mtl4c_prob.tuning import tune

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def score_on_test(data, model_name, params, fit, seed):
    train, test = split(data, "lpo", 0.2, seed)
    model = get_model(model_name, **params)
    start = time.perf_counter()
    model.fit(train, seed=seed, progress_bar=False, **fit)
    seconds = time.perf_counter() - start
    pred = model.predict(test, num_samples=300, seed=seed)
    overall = evaluate_frame(pred)["overall"]
    keys = ("rmse", "nll", "crps", "coverage_90")
    return {**{k: overall[k] for k in keys}, "fit_s": seconds}


def run_study(data, trials, seed, workers, folder, priors_only):
    start = time.perf_counter()
    # Priors only: the rank and the fit settings stay at the defaults.
    fixed = {"params": {"rank": 50}, "tune_fit": False} if priors_only else {}
    result = tune(
        data,
        "mf",
        n_trials=trials,
        seed=seed,
        workers=workers,
        out=folder,
        progress_bar=False,
        device="cpu",
        **fixed,
    )
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="keep the study folders here")
    parser.add_argument("--skip-two", action="store_true", help="skip the two-worker study")
    parser.add_argument(
        "--priors-only", action="store_true", help="search the prior scales and noise model only"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.WARNING)

    data, _ = load_responses([(args.data / "GDSC2_IC50.csv", "GDSC2")])
    print(f"GDSC2: {data.n_obs} pairs, {data.n_cells} cells, {data.n_drugs} drugs")
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} cores")
    root = args.out or Path(tempfile.mkdtemp(prefix="gdsc-tuning-"))

    defaults = score_on_test(data, "mf", {}, {"device": "cpu"}, args.seed)
    print(f"defaults on test: {defaults}")

    one, one_s = run_study(data, args.trials, args.seed, 1, root / "one", args.priors_only)
    counts = {s.name: sum(t.state == s for t in one.study.trials) for s in optuna.trial.TrialState}
    print(f"1 worker: {args.trials} trials in {one_s:.0f} s; {counts}")
    print(f"  validation NLL: defaults {one.default_value:.4f}, best {one.best_value:.4f}")
    print(f"  best: {one.best_params} {one.best_fit}")
    tuned = score_on_test(data, "mf", one.best_params, {**one.best_fit, "device": "cpu"}, args.seed)
    print(f"tuned on test: {tuned}")

    rows = {
        "defaults_test": defaults,
        "tuned_test": tuned,
        "one_worker_s": one_s,
        "val_nll_defaults": one.default_value,
        "val_nll_best": one.best_value,
        "best_params": one.best_params,
        "best_fit": one.best_fit,
        "trial_states": counts,
        "load_start": load,
    }
    if not args.skip_two:
        two, two_s = run_study(data, args.trials, args.seed, 2, root / "two", args.priors_only)
        print(f"2 workers: {args.trials} trials in {two_s:.0f} s; ratio {two_s / one_s:.2f}")
        print(f"  validation NLL best {two.best_value:.4f}")
        rows.update({"two_workers_s": two_s, "ratio": two_s / one_s, "two_best": two.best_value})
    rows["load_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
