import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from mtl4c_prob.data import TensorData
from mtl4c_prob.exceptions import ConvergenceWarning
from mtl4c_prob.inference import (
    FitResult,
    SVIConfig,
    fit_svi,
    heldout_nll,
    local_params,
    make_guide,
    resolve_device,
)

PRIOR_SD, NOISE_SD = 3.0, 1.0


def conjugate_model(data, subsample_size=None):
    """y_i ~ N(mu, 1), mu ~ N(0, 3^2): the posterior of mu is Gaussian in closed form."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("observations", data.n_obs, subsample_size=subsample_size) as idx:
        pyro.deterministic("loc", mu.expand(len(idx)))
        pyro.deterministic("scale", torch.full((len(idx),), NOISE_SD))
        y = None if data.y is None else data.y[idx]
        pyro.sample("obs", dist.Normal(mu, NOISE_SD), obs=y)


def tensors(y):
    n = len(y)
    zeros = torch.zeros(n, dtype=torch.long)
    return TensorData(
        zeros,
        zeros,
        zeros,
        torch.as_tensor(y, dtype=torch.float32),
        None,
        None,
        None,
        n_tasks=1,
        n_cells=1,
        n_drugs=1,
    )


def analytic(y):
    precision = 1 / PRIOR_SD**2 + len(y) / NOISE_SD**2
    return y.sum() / NOISE_SD**2 / precision, precision**-0.5


@pytest.fixture
def observations():
    return np.random.default_rng(0).normal(1.5, NOISE_SD, size=200)


def posterior(guide):
    loc = guide.locs.mu.item()
    scale = guide.scales.mu.item()
    return loc, scale


@pytest.mark.parametrize("batch_size", [None, 50], ids=["full-batch", "minibatch"])
def test_svi_matches_conjugate_posterior(observations, batch_size):
    mean, sd = analytic(observations)
    with local_params():
        guide = make_guide("normal", conjugate_model)
        config = SVIConfig(
            steps=1500, lr=0.05, lr_decay=0.05, batch_size=batch_size, progress_bar=False, seed=1
        )
        result = fit_svi(conjugate_model, guide, tensors(observations), config)
        loc, scale = posterior(guide)
    # The posterior sd is 0.07; SVI noise after a decayed schedule is well below it, and
    # minibatches (a quarter of the rows) add gradient noise, hence the looser bound.
    tol = 0.02 if batch_size is None else 0.04
    assert abs(loc - mean) < tol
    assert abs(scale - sd) / sd < 0.25
    assert result.steps == 1500 and len(result.losses) == 1500
    assert result.elapsed > 0 and result.settings["batch_size"] == batch_size


def test_delta_guide_gives_map(observations):
    mean, _ = analytic(observations)
    with local_params():
        guide = make_guide("delta", conjugate_model)
        fit_svi(
            conjugate_model,
            guide,
            tensors(observations),
            SVIConfig(steps=800, lr=0.05, progress_bar=False),
        )
        # With a Gaussian prior and likelihood, the MAP equals the posterior mean.
        assert abs(guide.median()["mu"].item() - mean) < 0.02


def test_seeded_fits_are_reproducible(observations):
    runs = []
    for _ in range(2):
        with local_params():
            guide = make_guide("normal", conjugate_model)
            result = fit_svi(
                conjugate_model,
                guide,
                tensors(observations),
                SVIConfig(steps=50, seed=3, progress_bar=False),
            )
            runs.append((result.losses, posterior(guide)))
    assert runs[0] == runs[1]


def test_heldout_nll_near_gaussian_entropy(observations):
    with local_params():
        guide = make_guide("normal", conjugate_model)
        fit_svi(
            conjugate_model,
            guide,
            tensors(observations),
            SVIConfig(steps=800, lr=0.05, progress_bar=False),
        )
        fresh = np.random.default_rng(5).normal(1.5, NOISE_SD, size=4000)
        nll = heldout_nll(conjugate_model, guide, tensors(fresh), num_samples=16)
    # Expected NLL of N(1.5, 1) data under N(~1.5, ~1): 0.5 log(2 pi e) = 1.419.
    assert abs(nll - 0.5 * math.log(2 * math.pi * math.e)) < 0.05


def test_heldout_early_stopping_restores_best(observations):
    with local_params():
        guide = make_guide("normal", conjugate_model)
        config = SVIConfig(
            steps=3000,
            lr=0.05,
            early_stopping="heldout",
            eval_every=25,
            patience=2,
            tol=1e-3,
            progress_bar=False,
        )
        result = fit_svi(
            conjugate_model,
            guide,
            tensors(observations),
            config,
            val_data=tensors(observations[:50]),
        )
    assert result.stopped_early and result.steps < 3000
    assert result.best_step is not None and result.best_step <= result.steps
    assert [s for s, _ in result.val_losses] == list(range(25, result.steps + 1, 25))


def test_plateau_stopping_and_warning(observations):
    with local_params():
        guide = make_guide("normal", conjugate_model)
        config = SVIConfig(
            steps=4000,
            lr=0.05,
            early_stopping="plateau",
            eval_every=100,
            patience=2,
            tol=1e-3,
            progress_bar=False,
        )
        result = fit_svi(conjugate_model, guide, tensors(observations), config)
    assert result.stopped_early and result.steps < 4000
    with local_params():
        guide = make_guide("normal", conjugate_model)
        config = SVIConfig(
            steps=40, early_stopping="plateau", eval_every=10, patience=50, progress_bar=False
        )
        with pytest.warns(ConvergenceWarning, match="plateau"):
            fit_svi(conjugate_model, guide, tensors(observations), config)


def test_adam_with_schedule(observations):
    mean, _ = analytic(observations)
    with local_params():
        guide = make_guide("normal", conjugate_model)
        fit_svi(
            conjugate_model,
            guide,
            tensors(observations),
            SVIConfig(steps=1500, lr=0.05, optimizer="adam", progress_bar=False),
        )
        assert abs(posterior(guide)[0] - mean) < 0.03


def test_lowrank_guide_runs(observations):
    with local_params():
        guide = make_guide("lowrank", conjugate_model, rank=1)
        result = fit_svi(
            conjugate_model, guide, tensors(observations), SVIConfig(steps=20, progress_bar=False)
        )
    assert np.isfinite(result.losses).all()


def test_fit_result_round_trip():
    result = FitResult(losses=[1.0, 0.5], val_losses=[(1, 2.0)], steps=2, elapsed=0.1)
    assert FitResult.from_dict(result.to_dict()) == result


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"lr_decay": 0.0}, "lr_decay"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"early_stopping": "sometimes"}, "early_stopping"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_particles": 0}, "num_particles"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVIConfig(**kwargs)


def test_heldout_stopping_needs_validation(observations):
    with local_params(), pytest.raises(ValueError, match="val_data"):
        fit_svi(
            conjugate_model,
            make_guide("normal", conjugate_model),
            tensors(observations),
            SVIConfig(early_stopping="heldout", progress_bar=False),
        )


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_guide():
    with pytest.raises(ValueError, match="unknown guide"):
        make_guide("flow", conjugate_model)


def test_callback_sees_every_step_and_heldout_evaluations(observations):
    calls = []
    with local_params():
        guide = make_guide("normal", conjugate_model)
        config = SVIConfig(steps=60, eval_every=20, progress_bar=False, callback=_record(calls))
        result = fit_svi(
            conjugate_model, guide, tensors(observations), config, tensors(observations[:40])
        )
    assert [c[0] for c in calls] == list(range(1, 61))
    assert [c[1] for c in calls] == result.losses
    evaluated = [(step, val) for step, _, val in calls if val is not None]
    assert [s for s, _ in evaluated] == [20, 40, 60]
    assert evaluated == result.val_losses
    # The callback is not part of the saved settings.
    assert "callback" not in result.settings


def test_callback_does_not_change_the_fit(observations):
    runs = []
    for callback in (None, _record([])):
        with local_params():
            guide = make_guide("normal", conjugate_model)
            config = SVIConfig(steps=80, eval_every=20, seed=2, progress_bar=False)
            config.callback = callback
            result = fit_svi(
                conjugate_model, guide, tensors(observations), config, tensors(observations[:40])
            )
            runs.append((result.losses, posterior(guide)))
    assert runs[0] == runs[1]


def test_callback_exception_stops_the_fit(observations):
    class StopError(Exception):
        pass

    def stop_at_30(step, loss, val_loss):
        if step == 30:
            raise StopError

    with local_params(), pytest.raises(StopError):
        fit_svi(
            conjugate_model,
            make_guide("normal", conjugate_model),
            tensors(observations),
            SVIConfig(steps=100, progress_bar=False, callback=stop_at_30),
        )
    with pytest.raises(TypeError, match="callback"):
        SVIConfig(callback=3)


def _record(calls):
    def callback(step, loss, val_loss):
        calls.append((step, loss, val_loss))

    return callback
