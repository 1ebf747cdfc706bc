import warnings
from pathlib import Path

import pytest
import torch

from mtl4c_prob.data import make_latent_factor_data, split

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

warnings.filterwarnings("ignore", message=".*ArviZ is undergoing a major refactor.*")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tests are timed on 2 cores; one torch thread keeps fits predictable.
    torch.set_num_threads(1)
    yield


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny():
    """About 60 cells x 15 drugs x 3 correlated tasks, with missing entries."""
    data, truth = make_latent_factor_data(
        n_cells=60, n_drugs=15, n_tasks=3, rank=3, noise=0.3, missing=0.3, seed=1
    )
    return data, truth


@pytest.fixture(scope="session")
def tiny_split(tiny):
    data, _ = tiny
    return split(data, "lpo", 0.2, seed=0)


@pytest.fixture(scope="session")
def gdsc_dir():
    if not (DATA / "GDSC2_IC50.csv").is_file():
        pytest.skip(f"real GDSC data not found at {DATA}")
    return DATA
