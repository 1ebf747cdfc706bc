"""The exact GP's structured covariance operator and its iterative marginal likelihood."""

import math

import pyro
import pytest
import torch

from mtl4c_prob.data import make_latent_factor_data, split
from mtl4c_prob.evaluation.metrics import rmse
from mtl4c_prob.models._gp_exact import CG_MIN_OBS, ExactGP
from mtl4c_prob.models._gp_structured import RowCovariance, structured_log_marginal


def _problem(product: bool, n: int = 600, seed: int = 0):
    """Random rows of a 30 x 40 grid, two tasks, kernels from random features."""
    g = torch.Generator().manual_seed(seed)
    n_cells, n_drugs = 30, 40
    flat = torch.randperm(n_cells * n_drugs, generator=g)[:n]
    cell, drug = flat // n_drugs, flat % n_drugs
    task = torch.randint(0, 2, (n,), generator=g)
    Xc, Xd = torch.randn(n_cells, 3, generator=g), torch.randn(n_drugs, 4, generator=g)
    params = {
        "log_ls": torch.tensor([0.5, 0.8], dtype=torch.float64, requires_grad=True),
        "drug_var": torch.tensor(0.4, dtype=torch.float64, requires_grad=True),
        "task_var": torch.tensor([0.1, 0.2], dtype=torch.float64, requires_grad=True),
        "cell_var": torch.tensor(0.15, dtype=torch.float64, requires_grad=True),
    }

    def covariance():
        ls = params["log_ls"].exp()
        Kc = 0.6 * torch.exp(-(torch.cdist(Xc, Xc).double() ** 2) / (2 * ls[0] ** 2))
        Kd = torch.exp(-(torch.cdist(Xd, Xd).double() ** 2) / (2 * ls[1] ** 2))
        return RowCovariance(
            Kc, Kd, params["drug_var"], params["task_var"], params["cell_var"],
            task=task, cell=cell, drug=drug, n_tasks=2, product=product,
        )  # fmt: skip

    def dense(op):
        c, d, t = cell, drug, task
        Kc, Kd = op.Kc[c][:, c], op.Kd[d][:, d]
        K = Kc * Kd if product else Kc + Kd
        same_drug = (d[:, None] == d[None, :]).double()
        K = K + params["drug_var"] * same_drug
        K = K + params["task_var"][t][:, None] * same_drug * (t[:, None] == t[None, :]).double()
        return K + params["cell_var"] * (c[:, None] == c[None, :]).double()

    return covariance, dense, params


@pytest.mark.parametrize("product", [True, False])
def test_operator_matches_the_dense_covariance(product):
    covariance, dense, _ = _problem(product)
    op = covariance()
    K = dense(op)
    rhs = torch.randn(K.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op._matmul(rhs), K @ rhs)
    torch.testing.assert_close(op._matmul(rhs[:, 0]), K @ rhs[:, 0])
    torch.testing.assert_close(op._diagonal(), K.diagonal())
    rows, cols = torch.tensor([0, 5, 7, 7]), torch.tensor([3, 5, 1, 7])
    torch.testing.assert_close(op._get_indices(rows, cols), K[rows, cols])
    torch.testing.assert_close(op.to_dense(), K)


@pytest.mark.parametrize("product", [True, False])
def test_iterative_marginal_likelihood_matches_the_exact_one(product):
    covariance, dense, params = _problem(product)
    n = 600
    noise = torch.full((n,), 0.3, dtype=torch.float64)
    S = dense(covariance()) + torch.diag(noise)
    y = torch.linalg.cholesky(S.detach()) @ torch.randn(n, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), S)
    exact_lp = exact.log_prob(y)
    exact_grad = torch.autograd.grad(exact_lp, list(params.values()))

    torch.manual_seed(0)
    values, grads = [], []
    for _ in range(8):  # the log determinant is a stochastic (Lanczos quadrature) estimate
        lp = structured_log_marginal(covariance(), noise, y)
        values.append(float(lp.detach()))
        grads.append(torch.autograd.grad(lp, list(params.values())))
    values = torch.tensor(values)
    # Eight 10-probe estimates: unbiased (their mean within four standard errors of the
    # exact value, plus the CG tolerance's share), each within 2% (the Hutchinson sd of
    # the log determinant with 10 probes is a few nats on these 600 rows).
    se = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - exact_lp) < 4 * se + 0.5
    assert torch.all((values - exact_lp).abs() < 0.02 * exact_lp.abs())
    mean_grad = torch.cat([torch.stack([g[i] for g in grads]).mean(0).flatten()
                           for i in range(len(params))])  # fmt: skip
    flat_exact = torch.cat([g.flatten() for g in exact_grad])
    cosine = mean_grad @ flat_exact / (mean_grad.norm() * flat_exact.norm())
    assert cosine > 0.98, f"averaged stochastic gradient points away (cosine {cosine:.3f})"


def test_solver_choice_and_bad_arguments():
    assert not ExactGP()._uses_cg(CG_MIN_OBS) and ExactGP()._uses_cg(CG_MIN_OBS + 1)
    assert not ExactGP(composite="none")._uses_cg(10 * CG_MIN_OBS)
    assert ExactGP(solver="cg")._uses_cg(10) and not ExactGP(solver="cholesky")._uses_cg(10**5)
    with pytest.raises(ValueError, match="solver must be one of"):
        ExactGP(solver="lu")
    with pytest.raises(ValueError, match="separable kernel"):
        ExactGP(solver="cg", composite="none")


def test_cg_training_agrees_with_cholesky_training():
    data, _ = make_latent_factor_data(n_cells=60, n_drugs=12, n_tasks=1, seed=3)
    train, test = split(data, "lpo", test_fraction=0.25, seed=0)
    fit = {"steps": 150, "lr": 0.05, "progress_bar": False, "seed": 0}
    exact = ExactGP(noise="task", solver="cholesky").fit(train, **fit)
    iterative = ExactGP(noise="task", solver="cg").fit(train, **fit)
    a, b = exact.predict(test, num_samples=2), iterative.predict(test, num_samples=2)
    # The same objective up to the stochastic log determinant: the fits land close.
    assert abs(rmse(test.y, b["mean"]) - rmse(test.y, a["mean"])) < 0.02 * rmse(test.y, a["mean"])
    assert (b["sd"] / a["sd"]).sub(1).abs().median() < 0.05
    # Training replays carry the joint likelihood as a factor and mask the per-row site.
    rows = iterative._tensors(train, iterative.device_, with_y=True)
    trace = pyro.poutine.trace(iterative.model).get_trace(rows)
    assert trace.nodes["marginal_likelihood"]["type"] == "sample"
    trace.compute_log_prob()
    assert float(trace.nodes["obs"]["log_prob_sum"]) == 0.0
