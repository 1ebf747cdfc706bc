"""The ``mtl4c-prob`` command: run, fit, predict, models, report, compare, tune, experiment."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

from mtl4c_prob import __version__
from mtl4c_prob._config import apply_fit_config
from mtl4c_prob.data import (
    SPLITS,
    DrugResponseData,
    load_responses,
    make_latent_factor_data,
    prepare_features,
    read_table,
    split,
)
from mtl4c_prob.exceptions import DataError, Mtl4cWarning
from mtl4c_prob.experiment import add_experiment_parser, cmd_experiment
from mtl4c_prob.models import DESCRIPTIONS, MODEL_FILE, get_model, load_model
from mtl4c_prob.tuning import add_tune_parser, cmd_tune

logger = logging.getLogger("mtl4c_prob.cli")

OUTPUT_MARKERS = ("metrics.json", "predictions.csv", "model")


class _DataAction(argparse.Action):
    """``--data FILE`` appends a (path, task) pair; ``--task NAME`` names the last one."""

    def __call__(self, parser, namespace, values, option_string=None):
        files = getattr(namespace, "data", None) or []
        if option_string == "--data":
            files.append([values, None])
        else:
            if not files:
                parser.error("--task must follow the --data FILE it names")
            files[-1][1] = values
        namespace.data = files


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mf", help="model name (see `mtl4c-prob models`)")
    p.add_argument("--rank", type=int, default=None, help="latent factors of factorisation models")
    p.add_argument("--single-task", action="store_true", help="fit one model per task")
    gp = p.add_argument_group("Gaussian processes (gp, sgp, icm, lmc, gp-full)")
    gp.add_argument("--kernel", default=None, choices=["rbf", "matern12", "matern32", "matern52"])
    gp.add_argument(
        "--composite",
        default=None,
        choices=["none", "product", "sum"],
        help="one kernel on [cell, drug] inputs (none), or a cell kernel times/plus a drug kernel",
    )
    gp.add_argument("--ard", action="store_true", help="one lengthscale per input column")
    gp.add_argument("--inducing", type=int, default=None, help="inducing points")
    gp.add_argument("--latents", type=int, default=None, help="latent GPs (lmc, gp-full)")
    gp.add_argument("--task-rank", type=int, default=None, help="rank of the ICM task covariance")
    gp.add_argument("--max-obs", type=int, default=None, help="exact GP: largest training set")
    p.add_argument("--steps", type=int, default=None, help="SVI steps")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate")
    p.add_argument(
        "--guide",
        default=None,
        choices=["normal", "lowrank", "delta"],
        help="variational family (default: the model's own; 'normal' for most, 'delta' for gp)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (default full)")
    p.add_argument("--num-samples", type=int, default=300, help="posterior draws for prediction")
    p.add_argument("--level", type=float, default=0.9, help="central interval probability")
    p.add_argument("--split", default="lpo", choices=sorted(SPLITS))
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--holdout-task", default=None, help="task held out by --split task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def _add_idata_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recalibrate",
        type=float,
        default=None,
        metavar="FRACTION",
        help="hold out this fraction of the training rows, fit per-task sd factors on them "
        "and write predictions_recalibrated.csv and recalibration.json (predictions.csv "
        "stays as the model predicts)",
    )
    p.add_argument(
        "--idata-draws", type=int, default=200, help="posterior draws in idata.nc (ArviZ)"
    )
    p.add_argument(
        "--idata-max-obs",
        type=int,
        default=10_000,
        help="training rows in idata.nc, chosen by a hash of the keys (0: all)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """Options naming the response files and feature tables (``fit``, ``tune``)."""
    p.add_argument(
        "--data",
        action=_DataAction,
        metavar="FILE",
        required=True,
        help="response file, one task each (repeatable)",
    )
    p.add_argument(
        "--task",
        action=_DataAction,
        metavar="NAME",
        dest="data",
        help="name of the task of the preceding --data",
    )
    p.add_argument("--format", default="auto", choices=["auto", "gdsc", "long"])
    p.add_argument("--response", default="auto", help="GDSC response column: LN_IC50 or AUC")
    p.add_argument("--cell-col", default="cell", help="long format: cell column")
    p.add_argument("--drug-col", default="drug", help="long format: drug column")
    p.add_argument("--y-col", default="y", help="long format: response column")
    p.add_argument("--task-col", default=None, help="long format: task column")
    p.add_argument("--censor-col", default=None, help="long format: censor column (0/+1/-1)")
    p.add_argument("--duplicates", default="mean", choices=["mean", "keep", "first", "error"])
    p.add_argument("--cell-features", type=Path, default=None)
    p.add_argument("--drug-features", type=Path, default=None)
    p.add_argument("--cell-pca", type=int, default=None, help="principal components of cells")
    p.add_argument("--drug-pca", type=int, default=None, help="principal components of drugs")
    p.add_argument(
        "--fingerprint-radius",
        type=int,
        default=2,
        help="Morgan radius when --drug-features holds SMILES (needs RDKit)",
    )
    p.add_argument(
        "--fingerprint-bits",
        type=int,
        default=1024,
        help="Morgan fingerprint length when --drug-features holds SMILES",
    )


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``mtl4c-prob`` command."""
    parser = argparse.ArgumentParser(
        prog="mtl4c-prob",
        description="Probabilistic multitask drug-response models on Pyro.",
    )
    parser.add_argument("--version", action="version", version=f"mtl4c-prob {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="fit, predict and report on built-in synthetic data")
    _add_common(run)
    _add_idata_options(run)
    run.set_defaults(out=Path("mtl4c-run"))
    for action in run._actions:
        if action.dest == "out":
            action.required = False

    fit = sub.add_parser("fit", help="fit a model on response files, predict the test split")
    _add_data_options(fit)
    _add_common(fit)
    _add_idata_options(fit)
    fit.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="model configuration (TOML, e.g. tune's best_config.toml); options given win",
    )

    pred = sub.add_parser("predict", help="predict (task, cell, drug) pairs from a saved model")
    pred.add_argument("--model-dir", required=True, type=Path)
    pred.add_argument("--pairs", required=True, type=Path, help="CSV with task, cell, drug")
    pred.add_argument("--out", required=True, type=Path, help="output CSV")
    pred.add_argument("--level", type=float, default=0.9)
    pred.add_argument("--num-samples", type=int, default=300)
    pred.add_argument("--seed", type=int, default=0)
    pred.add_argument("--device", default=None)
    pred.add_argument("-q", "--quiet", action="store_true")

    sub.add_parser("models", help="list the available models")

    rep = sub.add_parser("report", help="diagnostics report (HTML) of one or several fit folders")
    rep.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="fit folder(s)")
    rep.add_argument("--out", required=True, type=Path, help="output HTML file")
    rep.add_argument("--title", default=None)
    rep.add_argument("-q", "--quiet", action="store_true")

    cmp_ = sub.add_parser("compare", help="PSIS-LOO (or WAIC) of fit folders, ranked")
    cmp_.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="fit folder(s)")
    cmp_.add_argument("--ic", default="loo", choices=["loo", "waic"])
    cmp_.add_argument("--out", type=Path, default=None, help="CSV of the table")
    cmp_.add_argument("-q", "--quiet", action="store_true")

    add_tune_parser(sub)
    add_experiment_parser(sub)
    return parser


# ----------------------------------------------------------------------- outputs
class _OutputFolder:
    """Build an output folder next to its destination and move it in place at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out
        if out.exists() and not _replaceable(out):
            raise DataError(
                f"output folder {out} exists and is not an mtl4c-prob output folder; "
                "choose another --out"
            )

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)


def _replaceable(out: Path) -> bool:
    if not out.is_dir():
        return False
    names = {p.name for p in out.iterdir()}
    return not names or bool(names & set(OUTPUT_MARKERS))


#: Command-line option (argparse dest) -> model constructor argument.
_MODEL_OPTIONS = {
    "rank": "rank",
    "kernel": "kernel",
    "composite": "composite",
    "ard": "ard",
    "inducing": "n_inducing",
    "latents": "n_latents",
    "task_rank": "task_rank",
    "max_obs": "max_obs",
}


def _model_params(args) -> dict:
    """Return the constructor arguments the options give, for the options the model takes."""
    from mtl4c_prob.models import MODELS

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {list(MODELS)}")
    accepted = inspect.signature(MODELS[args.model]).parameters
    params = dict(getattr(args, "config_params", None) or {})
    for option, name in _MODEL_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None or value is False:
            continue
        if name not in accepted:
            flag = "--" + option.replace("_", "-")
            raise ValueError(f"model {args.model!r} has no {flag}")
        params[name] = value
    if args.single_task:
        params["multitask"] = False
    return params


def _fit_config(args) -> dict:
    """SVI settings given on the command line (the model's own defaults fill the rest)."""
    config = {
        **(getattr(args, "config_fit", None) or {}),
        "seed": args.seed,
        "device": args.device,
        "progress_bar": not args.quiet and sys.stderr.isatty(),
    }
    if args.guide:
        config["guide"] = args.guide
    if args.batch_size:
        config["batch_size"] = args.batch_size
    if args.steps:
        config["steps"] = args.steps
    if args.lr:
        config["lr"] = args.lr
    return config


def _fit_and_report(args, data: DrugResponseData, folder: Path, extra_info: dict) -> dict:
    """Split, fit, predict the held-out pairs and write every output file into ``folder``."""
    from mtl4c_prob.evaluation import evaluate_frame, to_inference_data, write_inference_data
    from mtl4c_prob.evaluation.diagnostics import IDATA_FILE
    from mtl4c_prob.evaluation.folder_report import FitFolder, write_folder_report

    if args.idata_draws < 2 or args.idata_draws % 2:
        raise DataError(f"--idata-draws must be an even number >= 2, got {args.idata_draws}")
    if args.idata_max_obs < 0:
        raise DataError(f"--idata-max-obs must be >= 0, got {args.idata_max_obs}")
    train, test = split(data, args.split, args.test_fraction, args.seed, args.holdout_task)
    cell_pca = getattr(args, "cell_pca", None)
    drug_pca = getattr(args, "drug_pca", None)
    if train.cell_features is not None or train.drug_features is not None:
        train, test = prepare_features(train, test, cell_pca=cell_pca, drug_pca=drug_pca)
    elif cell_pca or drug_pca:
        raise DataError("--cell-pca/--drug-pca need --cell-features/--drug-features")

    val = None
    if args.recalibrate:
        if not 0 < args.recalibrate < 1:
            raise DataError(f"--recalibrate must be a fraction in (0, 1), got {args.recalibrate}")
        # The validation rows mimic the test split (a new cell for LCO, ...); they are taken
        # from the training rows, so the model never sees them.
        kind = args.split if args.split in ("lpo", "lco", "ldo") else "lpo"
        train, val = split(train, kind, args.recalibrate, args.seed + 1)

    model = get_model(args.model, **_model_params(args))
    start = time.perf_counter()
    model.fit(train, **_fit_config(args))
    fit_seconds = time.perf_counter() - start
    pred = model.predict(test, level=args.level, num_samples=args.num_samples, seed=args.seed)

    columns = ["task", "cell", "drug", "y", "mean", "sd", "lower", "upper"]
    pred[columns].to_csv(folder / "predictions.csv", index=False)
    metrics = evaluate_frame(pred, level=args.level)
    info = {
        "model": args.model,
        "split": args.split,
        "test_fraction": args.test_fraction,
        "seed": args.seed,
        "level": args.level,
        "n_train": train.n_obs,
        "n_test": test.n_obs,
        "fit_seconds": round(fit_seconds, 3),
        "steps": model.fit_result_.steps,
        "device": model.fit_result_.device,
        **extra_info,
    }
    metrics["info"] = info
    if val is not None:
        metrics["recalibration"] = _recalibrate(args, model, val, pred, folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    model.save(folder / "model")
    (folder / "data_summary.json").write_text(
        json.dumps(data.summary(), indent=1, default=_json_default)
    )
    if hasattr(model, "task_correlation") and not hasattr(model, "task_models_"):
        _write_task_correlation(model, folder)
    idata = to_inference_data(
        model,
        train,
        num_samples=args.idata_draws,
        seed=args.seed,
        max_obs=args.idata_max_obs or None,
    )
    write_inference_data(idata, folder / IDATA_FILE)
    write_folder_report(
        [FitFolder.read(folder, name=args.model)],
        folder / "report.html",
        title=f"mtl4c-prob: {args.model} on {', '.join(map(str, data.tasks))}",
        level=args.level,
        seed=args.seed,
    )
    return metrics


def _recalibrate(args, model, val, pred, folder: Path) -> dict:
    """Per-task sd factors from the validation rows, applied to a separate predictions file."""
    from mtl4c_prob.evaluation import Recalibrator, recalibration_report

    val_pred = model.predict(val, level=args.level, num_samples=args.num_samples, seed=args.seed)
    report = recalibration_report(val_pred, pred, args.level)
    recal = Recalibrator(args.level).fit(val_pred)
    columns = ["task", "cell", "drug", "y", "mean", "sd", "lower", "upper"]
    recal.transform(pred)[columns].to_csv(folder / "predictions_recalibrated.csv", index=False)
    out = {
        "validation_rows": int(val.n_obs),
        "factors": recal.to_dict(),
        "before_after": json.loads(report.to_json(orient="index")),
    }
    (folder / "recalibration.json").write_text(json.dumps(out, indent=1, default=_json_default))
    return out


def _write_task_correlation(model, folder: Path) -> None:
    """Labelled task correlation (and covariance) of a multitask model, and its heatmap."""
    corr = model.task_correlation()
    corr.to_csv(folder / "task_correlation.csv")
    if hasattr(model, "task_covariance"):
        model.task_covariance().to_csv(folder / "task_covariance.csv")
    if hasattr(model, "plot_task_correlation"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.5, 3.8))
        FigureCanvasAgg(fig)
        model.plot_task_correlation(ax=fig.add_subplot(1, 1, 1))
        fig.tight_layout()
        fig.savefig(folder / "task_correlation.png", dpi=110)


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# ---------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    """Fit the multitask Bayesian MF on built-in synthetic data (three correlated tasks)."""
    data, truth = make_latent_factor_data(
        n_cells=300,
        n_drugs=60,
        n_tasks=3,
        rank=5,
        noise=[0.3, 0.4, 0.5],
        task_correlation=0.8,
        missing=[0.3, 0.5, 0.7],
        seed=args.seed,
    )
    if args.rank is None and args.model == "mf":
        args.rank = 8
    if args.steps is None:
        args.steps = 800
    with _OutputFolder(args.out) as folder:
        metrics = _fit_and_report(args, data, folder, {"data": "synthetic latent-factor, 3 tasks"})
    _print_metrics(metrics, args.out)
    return 0


def _load_data(args) -> tuple[DrugResponseData, object, list[tuple[Path, str | None]]]:
    """Read the response files and feature tables the data options name."""
    files = [(Path(p), t) for p, t in args.data]
    long_columns = {
        "cell": args.cell_col,
        "drug": args.drug_col,
        "y": args.y_col,
        "task_column": args.task_col,
        "censor": args.censor_col,
    }
    data, report = load_responses(
        files,
        format=args.format,
        response=args.response,
        cell_features=args.cell_features,
        drug_features=args.drug_features,
        duplicates=args.duplicates,
        long_columns=long_columns,
        fingerprint_radius=args.fingerprint_radius,
        fingerprint_bits=args.fingerprint_bits,
    )
    return data, report, files


def cmd_fit(args) -> int:
    """Fit a model on user files."""
    extra = {}
    if args.config is not None:
        apply_fit_config(args)
        extra["config"] = str(args.config)
    with _OutputFolder(args.out) as folder:
        data, report, files = _load_data(args)
        extra["files"] = [str(p) for p, _ in files]
        metrics = _fit_and_report(args, data, folder, extra)
        (folder / "harmonisation.json").write_text(json.dumps(report.to_dict(), indent=1))
    _print_metrics(metrics, args.out)
    return 0


def cmd_predict(args) -> int:
    """Predict pairs from a saved model."""
    model_dir = args.model_dir
    if not (model_dir / MODEL_FILE).is_file() and (model_dir / "model" / MODEL_FILE).is_file():
        model_dir = model_dir / "model"
    if not (model_dir / MODEL_FILE).is_file():
        raise DataError(f"no saved model in {args.model_dir}")
    model = load_model(model_dir, device=args.device)
    pairs = read_table(args.pairs)
    pairs.columns = [str(c).strip().lower() for c in pairs.columns]
    if "task" not in pairs.columns and len(model.tasks_) == 1:
        pairs["task"] = model.tasks_[0]
    missing = [c for c in ("task", "cell", "drug") if c not in pairs.columns]
    if missing:
        raise DataError(f"{args.pairs}: column(s) {missing} missing; it has {list(pairs.columns)}")
    pred = model.predict(
        pairs[["task", "cell", "drug"]],
        level=args.level,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    pred[["task", "cell", "drug", "mean", "sd", "lower", "upper"]].to_csv(tmp, index=False)
    os.replace(tmp, args.out)
    print(f"wrote {len(pred)} predictions to {args.out}")
    return 0


def cmd_models(args) -> int:
    """List the models."""
    width = max(map(len, DESCRIPTIONS))
    for name, text in DESCRIPTIONS.items():
        print(f"{name:<{width}}  {text}")
    return 0


def _print_metrics(metrics: dict, out: Path) -> None:
    overall = metrics["overall"]
    keys = [k for k in ("rmse", "pearson", "nll", "crps") if k in overall]
    keys += [k for k in overall if k.startswith("coverage_")]
    print("overall: " + ", ".join(f"{k} {overall[k]:.4f}" for k in keys))
    for task, values in metrics["per_task"].items():
        print(f"  {task}: " + ", ".join(f"{k} {values[k]:.4f}" for k in keys if k in values))
    print(f"outputs in {out}")


def cmd_report(args) -> int:
    """Write the diagnostics report of fit folders."""
    from mtl4c_prob.evaluation.folder_report import write_folder_report

    if args.out.suffix.lower() not in (".html", ".htm"):
        raise DataError(f"--out must name an .html file, got {args.out}")
    start = time.perf_counter()
    write_folder_report(args.dirs, args.out, title=args.title)
    print(f"wrote {args.out} ({len(args.dirs)} fit(s), {time.perf_counter() - start:.1f} s)")
    return 0


def cmd_compare(args) -> int:
    """Print (and save) PSIS-LOO or WAIC of fit folders, ranked when several."""
    from mtl4c_prob.evaluation.diagnostics import compare, elpd_summary, loo, waic

    names = [_fit_name(d) for d in args.dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in args.dirs]
    if len(args.dirs) == 1:
        result = (loo if args.ic == "loo" else waic)(args.dirs[0])
        table = pd.DataFrame([elpd_summary(result)], index=names)
    else:
        table = compare(dict(zip(names, args.dirs, strict=True)), ic=args.ic)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out)
    return 0


def _fit_name(folder: Path) -> str:
    metrics = folder / "metrics.json"
    if metrics.is_file():
        model = json.loads(metrics.read_text()).get("info", {}).get("model")
        if model:
            return str(model)
    return folder.name


COMMANDS = {
    "run": cmd_run,
    "fit": cmd_fit,
    "predict": cmd_predict,
    "models": cmd_models,
    "report": cmd_report,
    "compare": cmd_compare,
    "tune": cmd_tune,
    "experiment": cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mtl4c-prob`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    warnings.simplefilter("default", Mtl4cWarning)
    warnings.filterwarnings("ignore", message=".*ArviZ is undergoing a major refactor.*")
    try:
        return COMMANDS[args.command](args)
    except (DataError, ValueError, KeyError, FileNotFoundError, TypeError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"mtl4c-prob: error: {message}", file=sys.stderr)
        return 2
    except pd.errors.EmptyDataError as exc:
        print(f"mtl4c-prob: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
