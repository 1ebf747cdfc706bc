"""Loaders for GDSC release files, generic long tables and feature tables."""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mtl4c_prob.data._dataset import DrugResponseData, _item
from mtl4c_prob.data._smiles import NO_STRUCTURE, is_smiles_table, morgan_fingerprints
from mtl4c_prob.exceptions import DataError, DataWarning, warn_external

logger = logging.getLogger(__name__)

__all__ = [
    "HarmonisationReport",
    "harmonise_cells",
    "harmonise_key",
    "load_features",
    "load_responses",
    "read_gdsc",
    "read_long",
    "read_table",
]

GDSC_CELL, GDSC_DRUG = "CELL_LINE_NAME", "DRUG_NAME"
GDSC_RESPONSES = ("LN_IC50", "AUC")
DUPLICATES = ("mean", "keep", "first", "error")


def read_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """Read a CSV, TSV, Parquet or Excel file, with clear errors for missing or empty files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"file is empty: {path}")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:
        if suffix.endswith((".parquet", ".pq")):
            table = pd.read_parquet(path, **kwargs)
        elif suffix.endswith((".xlsx", ".xls")):
            table = pd.read_excel(path, **kwargs)
        else:
            sep = "\t" if suffix.endswith((".tsv", ".tab", ".tsv.gz", ".txt")) else ","
            table = pd.read_csv(path, sep=sep, **kwargs)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if table.empty:
        raise DataError(f"file has no data rows: {path}")
    return table


def read_gdsc(path: str | Path, response: str = "auto", task: str | None = None) -> pd.DataFrame:
    """Read a GDSC fitted-dose-response table (the public release file or a subset of it).

    Parameters
    ----------
    path : str or Path
        File with columns ``CELL_LINE_NAME``, ``DRUG_NAME`` and ``LN_IC50`` and/or ``AUC``
        (other release columns such as COSMIC_ID or DRUG_ID are ignored).
    response : {"auto", "LN_IC50", "AUC"}, default="auto"
        Response column; "auto" takes LN_IC50 when present, else AUC.
    task : str, optional
        Task name; defaults to the file name without its suffix.

    Returns
    -------
    DataFrame
        Long table with columns task, cell, drug, y.
    """
    table = read_table(path)
    missing = [c for c in (GDSC_CELL, GDSC_DRUG) if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: GDSC layout needs column(s) {missing}; found {list(table.columns)}"
        )
    if response == "auto":
        found = [c for c in GDSC_RESPONSES if c in table.columns]
        if not found:
            raise DataError(
                f"{path}: no response column; expected one of {list(GDSC_RESPONSES)}, "
                f"found {list(table.columns)}"
            )
        response = found[0]
    elif response not in table.columns:
        raise DataError(f"{path}: response column {response!r} not found in {list(table.columns)}")
    return _long(table, path, task, GDSC_CELL, GDSC_DRUG, response, None, None)


def read_long(
    path: str | Path,
    *,
    cell: str = "cell",
    drug: str = "drug",
    y: str = "y",
    task: str | None = None,
    task_column: str | None = None,
    censor: str | None = None,
) -> pd.DataFrame:
    """Read a generic long table (CSV or Parquet) with user-given column names.

    Parameters
    ----------
    path : str or Path
        The file.
    cell, drug, y : str
        Column names of the cell line, the drug and the response.
    task : str, optional
        Task name for every row (default: the file name), unless ``task_column`` is given.
    task_column : str, optional
        Column holding the task of each row, so one file may hold several tasks.
    censor : str, optional
        Column with 0 (measured), +1 (at least y) or -1 (at most y).
    """
    table = read_table(path)
    return _long(table, path, task, cell, drug, y, task_column, censor)


def _long(table, path, task, cell, drug, y, task_column, censor) -> pd.DataFrame:
    wanted = [c for c in (cell, drug, y, task_column, censor) if c is not None]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {missing} not found; the file has {list(table.columns)}"
        )
    out = pd.DataFrame(
        {
            "task": table[task_column].astype(str) if task_column else (task or Path(path).stem),
            "cell": table[cell].astype(str).str.strip(),
            "drug": table[drug].astype(str).str.strip(),
            "y": _response(table[y], path, y),
        }
    )
    if censor is not None:
        out["censor"] = table[censor].to_numpy()
    return out


def _response(col: pd.Series, path, name: str) -> np.ndarray:
    values = pd.to_numeric(col, errors="coerce")
    bad = values.isna().to_numpy() | ~np.isfinite(values.to_numpy(dtype=float))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        kind = "missing" if pd.isna(col.iloc[row]) else "non-numeric or non-finite"
        raise DataError(
            f"{path}: response column {name!r} has a {kind} value {_item(col, row)!r} at data "
            f"row {row + 1} ({int(bad.sum())} such rows); clean the file or drop those rows"
        )
    return values.to_numpy(dtype=float)


def harmonise_key(name: str) -> str:
    """Spelling-insensitive key of a cell-line name: upper case, alphanumerics only.

    ``harmonise_key("NCI-H1650") == harmonise_key("NCIH1650") == "NCIH1650"``.
    """
    return re.sub(r"[^0-9A-Z]", "", str(name).upper())


@dataclass
class HarmonisationReport:
    """What cell-name harmonisation merged, refused to merge, and could not match.

    Attributes
    ----------
    renamed : dict of str to str
        Original spelling -> canonical name, for spellings that were merged.
    collisions : dict of str to list of str
        Key -> distinct spellings that occur within one source: these are treated as
        different cell lines (e.g. ``KM-H2`` and ``KMH-2`` in GDSC2) and never merged.
    unmatched_features : list of str
        Response cells with no row in the cell feature table.
    unused_feature_rows : int
        Feature rows that match no response cell.
    """

    renamed: dict[str, str] = field(default_factory=dict)
    collisions: dict[str, list[str]] = field(default_factory=dict)
    unmatched_features: list[str] = field(default_factory=list)
    unused_feature_rows: int = 0

    def log(self) -> None:
        """Log a summary (INFO) and a warning for collisions and unmatched cells."""
        logger.info("cell names: %d spellings merged across sources", len(self.renamed))
        if self.collisions:
            warn_external(
                f"{len(self.collisions)} cell-name key(s) are shared by different cell lines "
                f"within one source and were kept apart: "
                + "; ".join(" vs ".join(v) for v in self.collisions.values()),
                DataWarning,
            )
        if self.unmatched_features:
            logger.warning(
                "%d cell(s) have no feature row (first: %s)",
                len(self.unmatched_features),
                ", ".join(self.unmatched_features[:5]),
            )

    def to_dict(self) -> dict:
        """JSON-ready representation."""
        return {
            "renamed": self.renamed,
            "collisions": self.collisions,
            "unmatched_features": self.unmatched_features,
            "unused_feature_rows": self.unused_feature_rows,
        }


def harmonise_cells(
    frames: list[pd.DataFrame], cell_features: pd.DataFrame | None = None
) -> tuple[list[pd.DataFrame], pd.DataFrame | None, HarmonisationReport]:
    """Give each cell line one name across response tables and the cell feature table.

    Spellings that differ only in case and punctuation (``NCI-H1650``, ``NCIH1650``) are merged
    to the first spelling seen, unless one source holds two such spellings: then they are
    different cell lines, are kept apart everywhere, and get no feature row by key (an exact
    name match still counts).

    Returns
    -------
    frames : list of DataFrame
        The response tables with harmonised ``cell`` columns.
    cell_features : DataFrame or None
        The feature table re-indexed by canonical names (rows without a match are kept under
        their own name, so they stay available for prediction).
    report : HarmonisationReport
    """
    report = HarmonisationReport()
    spellings: dict[str, list[str]] = defaultdict(list)
    for frame in frames:
        by_key = defaultdict(set)
        for name in frame["cell"].unique():
            by_key[harmonise_key(name)].add(name)
        for key, names in by_key.items():
            if len(names) > 1:
                report.collisions[key] = sorted(set(report.collisions.get(key, [])) | names)
            for name in sorted(names):
                if name not in spellings[key]:
                    spellings[key].append(name)

    mapping: dict[str, str] = {}
    for key, names in spellings.items():
        if key in report.collisions:
            mapping.update({n: n for n in names})
        else:
            mapping.update({n: names[0] for n in names})
    report.renamed = {k: v for k, v in mapping.items() if k != v}
    frames = [f.assign(cell=f["cell"].map(mapping)) for f in frames]

    if cell_features is not None:
        cell_features, report = _match_features(cell_features, mapping, spellings, report)
    report.log()
    return frames, cell_features, report


def _match_features(table, mapping, spellings, report):
    table = table.copy()
    canonical = set(mapping.values())
    new_index = []
    for name in table.index.astype(str):
        if name in canonical:
            new_index.append(name)
            continue
        key = harmonise_key(name)
        if key in spellings and key not in report.collisions:
            new_index.append(mapping[spellings[key][0]])
        else:
            new_index.append(name)
    table.index = pd.Index(new_index, name=table.index.name)
    if table.index.has_duplicates:
        dup = int(table.index.duplicated().sum())
        warn_external(
            f"{dup} feature row(s) map to an already matched cell and are dropped",
            DataWarning,
        )
        table = table[~table.index.duplicated()]
    report.unmatched_features = sorted(canonical - set(table.index))
    report.unused_feature_rows = int((~table.index.isin(list(canonical))).sum())
    return table, report


def _duplicates(frame: pd.DataFrame, how: str) -> pd.DataFrame:
    if how not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {how!r}")
    keys = ["task", "cell", "drug"]
    dup = frame.duplicated(keys, keep=False)
    n_rows = int(dup.sum())
    if n_rows == 0:
        return frame
    n_pairs = int(frame.loc[dup, keys].drop_duplicates().shape[0])
    if how == "error":
        first = frame.loc[dup, keys].iloc[0].tolist()
        raise DataError(
            f"{n_rows} rows repeat {n_pairs} (task, cell, drug) pairs (first: {first}); pass "
            "duplicates='mean', 'first' or 'keep'"
        )
    logger.info("duplicates=%r: %d rows repeat %d pairs", how, n_rows, n_pairs)
    if how == "keep":
        return frame
    if how == "first":
        return frame.drop_duplicates(keys, keep="first").reset_index(drop=True)
    agg = {"y": "mean"}
    if "censor" in frame.columns:
        agg["censor"] = "max"
    return frame.groupby(keys, sort=False, as_index=False).agg(agg)


def _detect(path: Path) -> str:
    head = (
        read_table(path, nrows=5)
        if path.suffix.lower() in (".csv", ".tsv", ".txt")
        else (read_table(path))
    )
    cols = set(head.columns)
    if {GDSC_CELL, GDSC_DRUG} <= cols:
        return "gdsc"
    if {"cell", "drug", "y"} <= cols:
        return "long"
    raise DataError(
        f"{path}: cannot tell the layout from the columns {sorted(map(str, cols))}; expected "
        f"GDSC ({GDSC_CELL}, {GDSC_DRUG}, LN_IC50 or AUC) or long (cell, drug, y[, task]); "
        "pass format='long' with the column names"
    )


def load_responses(
    files: list[str | Path | tuple[str | Path, str | None]],
    *,
    format: str = "auto",
    response: str = "auto",
    cell_features: str | Path | pd.DataFrame | None = None,
    drug_features: str | Path | pd.DataFrame | None = None,
    duplicates: str = "mean",
    long_columns: dict | None = None,
    fingerprint_radius: int = 2,
    fingerprint_bits: int = 1024,
) -> tuple[DrugResponseData, HarmonisationReport]:
    """Load one task per file (or several per long file) into a :class:`DrugResponseData`.

    Parameters
    ----------
    files : list of path or (path, task name)
        Response files; a file's task is named after the file unless a name is given.
    format : {"auto", "gdsc", "long"}, default="auto"
        File layout; "auto" looks at the column names.
    response : str, default="auto"
        GDSC response column ("LN_IC50" or "AUC"); ignored for long tables.
    cell_features, drug_features : path or DataFrame, optional
        Entity x feature tables (first column or index holds the names).
    duplicates : {"mean", "keep", "first", "error"}, default="mean"
        What to do with rows that repeat a (task, cell, drug) pair.
    long_columns : dict, optional
        Keyword arguments of :func:`read_long` (cell, drug, y, task_column, censor).
    fingerprint_radius, fingerprint_bits : int
        Morgan fingerprint settings when ``drug_features`` is a name + SMILES table.

    Returns
    -------
    data : DrugResponseData
    report : HarmonisationReport
    """
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates must be one of {DUPLICATES}, got {duplicates!r}")
    if format not in ("auto", "gdsc", "long"):
        raise ValueError(f"format must be 'auto', 'gdsc' or 'long', got {format!r}")
    if not files:
        raise ValueError("at least one response file is needed")
    frames = []
    for item in files:
        path, task = item if isinstance(item, tuple) else (item, None)
        path = Path(path)
        kind = _detect(path) if format == "auto" else format
        if kind == "gdsc":
            frame = read_gdsc(path, response=response, task=task)
        else:
            frame = read_long(path, task=task, **(long_columns or {}))
        logger.info("%s: %d rows (%s layout)", path, len(frame), kind)
        frames.append(frame)

    cells = load_features(cell_features, "cell") if cell_features is not None else None
    drugs = None
    if drug_features is not None:
        drugs = load_features(drug_features, "drug", fingerprint_radius, fingerprint_bits)
    frames, cells, report = harmonise_cells(frames, cells)
    frame = _duplicates(pd.concat(frames, ignore_index=True), duplicates)
    for name, rows in frame.groupby("task", sort=False):
        if len(rows) == 0:
            raise DataError(f"task {name!r} has no rows")
    if drugs is not None:
        drugs = _match_drugs(drugs, frame["drug"].unique())
        missing = sorted(set(frame["drug"]) - set(drugs.index))
        if missing and NO_STRUCTURE in drugs.columns:
            # Fingerprint fallback for drugs absent from the SMILES table (see _smiles.py).
            extra = pd.DataFrame(0.0, index=pd.Index(missing), columns=drugs.columns)
            extra[NO_STRUCTURE] = 1.0
            drugs = pd.concat([drugs, extra])
            warn_external(
                f"{len(missing)} drug(s) of the responses have no SMILES row (first: "
                f"{missing[0]!r}); they get an all-zero fingerprint with {NO_STRUCTURE}=1",
                DataWarning,
            )
            missing = []
        if missing:
            logger.warning(
                "%d drug(s) have no feature row (first: %s)", len(missing), sorted(missing)[0]
            )
    return DrugResponseData(frame, cells, drugs), report


def _match_drugs(table: pd.DataFrame, names) -> pd.DataFrame:
    """Rename feature rows to the response spelling of the same drug.

    Only names that differ in case or punctuation, with a unique match, are renamed.
    """
    keys = pd.Series(list(names)).groupby(lambda i: harmonise_key(names[i])).agg(list)
    unique = {k: v[0] for k, v in keys.items() if len(v) == 1}
    known = set(names)
    renamed = [
        n if n in known else unique.get(harmonise_key(n), n) for n in table.index.astype(str)
    ]
    table = table.copy()
    table.index = pd.Index(renamed, name=table.index.name)
    return table[~table.index.duplicated()]


def load_features(
    source: str | Path | pd.DataFrame,
    kind: str = "cell",
    fingerprint_radius: int = 2,
    fingerprint_bits: int = 1024,
) -> pd.DataFrame:
    """Load an entity x feature table indexed by name.

    A file's index is its first column (or the Parquet index when it is named or not a
    plain range). Non-numeric columns other than the names are an error, except that a
    drug table with a ``smiles`` column (any case) becomes Morgan fingerprints (see
    :func:`~mtl4c_prob.data.morgan_fingerprints`; needs the optional RDKit extra).
    """
    if isinstance(source, pd.DataFrame):
        table = source.copy()
    else:
        table = read_table(source)
    if kind == "drug" and is_smiles_table(table):
        table, _ = morgan_fingerprints(table, fingerprint_radius, fingerprint_bits)
        return table
    if isinstance(table.index, pd.RangeIndex):
        table = table.set_index(table.columns[0])
    table.index = table.index.astype(str).str.strip()
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise DataError(
            f"{kind} feature table has non-numeric column(s) {non_numeric[:5]}; a feature table "
            "holds one name column and numeric features"
        )
    if table.index.has_duplicates:
        dup = table.index[table.index.duplicated()][0]
        raise DataError(f"{kind} feature table repeats the name {dup!r}")
    return table.astype(float)
