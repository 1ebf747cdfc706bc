"""Drug features from SMILES: Morgan fingerprints through RDKit (optional extra)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mtl4c_prob.exceptions import DataError, DataWarning, warn_external

logger = logging.getLogger(__name__)

__all__ = ["FingerprintReport", "is_smiles_table", "morgan_fingerprints"]

#: Name of the indicator column set to 1 for drugs without a usable structure.
NO_STRUCTURE = "no_structure"


def is_smiles_table(table: pd.DataFrame) -> bool:
    """Whether ``table`` has a SMILES column (any case)."""
    return any(str(c).strip().lower() == "smiles" for c in table.columns)


@dataclass
class FingerprintReport:
    """Which drugs got a fingerprint.

    Attributes
    ----------
    n_parsed : int
        Drugs whose SMILES parsed.
    missing : list of str
        Drugs with an empty SMILES entry.
    unparsable : list of str
        Drugs whose SMILES RDKit could not parse.
    """

    n_parsed: int = 0
    missing: list[str] = field(default_factory=list)
    unparsable: list[str] = field(default_factory=list)


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError:
        raise ImportError(
            "Morgan fingerprints from SMILES need RDKit, an optional extra: "
            "pip install 'mtl4c-prob[chem]' (or pip install rdkit), or pass a numeric drug "
            "feature table instead"
        ) from None
    RDLogger.DisableLog("rdApp.*")
    return Chem, rdFingerprintGenerator


def morgan_fingerprints(
    table: pd.DataFrame, radius: int = 2, n_bits: int = 1024
) -> tuple[pd.DataFrame, FingerprintReport]:
    """Morgan (ECFP-like) bit vectors of the drugs of a name + SMILES table.

    Parameters
    ----------
    table : DataFrame
        Indexed by drug name (or with the names in its first column) and with a ``smiles``
        column (any case).
    radius : int, default=2
        Morgan radius (2 is ECFP4-like).
    n_bits : int, default=1024
        Length of the bit vector.

    Returns
    -------
    features : DataFrame of shape (n_drugs, n_bits + 1)
        0/1 bit columns ``fp0``, ... and an indicator column ``no_structure``.
    report : FingerprintReport

    Notes
    -----
    Fallback for drugs without a usable structure: a drug whose SMILES is empty or does
    not parse keeps its row, with all bits 0 and ``no_structure = 1``, so a model can
    learn one shared effect for such drugs instead of mistaking them for a molecule with
    no substructures; nothing is dropped, and the counts are logged and reported. Drugs
    of the responses absent from the table are handled by the models like any drug
    without a feature row.
    """
    if radius < 0 or n_bits < 8:
        raise ValueError(f"need radius >= 0 and n_bits >= 8, got radius={radius}, n_bits={n_bits}")
    chem, generators = _rdkit()
    column = next(c for c in table.columns if str(c).strip().lower() == "smiles")
    if isinstance(table.index, pd.RangeIndex):
        names_col = next((c for c in table.columns if c != column), None)
        if names_col is None:
            raise DataError("SMILES table needs a drug-name column next to the smiles column")
        table = table.set_index(names_col)
    names = table.index.astype(str).str.strip()
    if names.has_duplicates:
        raise DataError(f"SMILES table repeats the drug name {names[names.duplicated()][0]!r}")

    generator = generators.GetMorganGenerator(radius=radius, fpSize=n_bits)
    bits = np.zeros((len(table), n_bits), dtype=np.float32)
    no_structure = np.zeros(len(table), dtype=np.float32)
    report = FingerprintReport()
    for i, (name, smiles) in enumerate(zip(names, table[column], strict=True)):
        text = "" if pd.isna(smiles) else str(smiles).strip()
        mol = chem.MolFromSmiles(text) if text else None
        if mol is None:
            no_structure[i] = 1.0
            (report.unparsable if text else report.missing).append(name)
            continue
        bits[i] = generator.GetFingerprintAsNumPy(mol)
        report.n_parsed += 1

    logger.info(
        "Morgan fingerprints (radius %d, %d bits): %d drugs parsed, %d without SMILES, "
        "%d unparsable",
        radius,
        n_bits,
        report.n_parsed,
        len(report.missing),
        len(report.unparsable),
    )
    if report.missing or report.unparsable:
        warn_external(
            f"{len(report.missing) + len(report.unparsable)} drug(s) have no usable SMILES "
            f"({len(report.missing)} empty, {len(report.unparsable)} unparsable); they get "
            f"an all-zero fingerprint with {NO_STRUCTURE}=1",
            DataWarning,
        )
    columns = [f"fp{i}" for i in range(n_bits)]
    features = pd.DataFrame(bits, index=pd.Index(names, name="drug"), columns=columns)
    features[NO_STRUCTURE] = no_structure
    return features, report
