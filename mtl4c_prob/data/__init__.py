"""What goes in: datasets, loaders, feature transforms, synthetic data and splits."""

from __future__ import annotations

from mtl4c_prob.data._dataset import DrugResponseData, TaskScaler, TensorData
from mtl4c_prob.data._features import FeatureTransformer, prepare_features
from mtl4c_prob.data._loaders import (
    HarmonisationReport,
    harmonise_cells,
    harmonise_key,
    load_features,
    load_responses,
    read_gdsc,
    read_long,
    read_table,
)
from mtl4c_prob.data._seed_synthetic import SyntheticDataCreator, SyntheticDraw
from mtl4c_prob.data._smiles import FingerprintReport, is_smiles_table, morgan_fingerprints
from mtl4c_prob.data._splits import SPLITS, kfold, kfold_indices, split, split_indices
from mtl4c_prob.data._synthetic import LatentFactorTruth, make_latent_factor_data

__all__ = [
    "SPLITS",
    "DrugResponseData",
    "FingerprintReport",
    "FeatureTransformer",
    "HarmonisationReport",
    "LatentFactorTruth",
    "SyntheticDataCreator",
    "SyntheticDraw",
    "TaskScaler",
    "TensorData",
    "harmonise_cells",
    "is_smiles_table",
    "harmonise_key",
    "kfold",
    "kfold_indices",
    "load_features",
    "load_responses",
    "make_latent_factor_data",
    "morgan_fingerprints",
    "prepare_features",
    "read_gdsc",
    "read_long",
    "read_table",
    "split",
    "split_indices",
]
