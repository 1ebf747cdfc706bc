"""Likelihoods shared by the models."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = ["CensoredNormal", "gaussian_likelihood"]


class CensoredNormal(dist.TorchDistribution):
    r"""Normal likelihood of partly censored responses.

    Status: stable.

    A row with ``censor == 0`` contributes the normal density of its value; ``censor == +1``
    ("at least y") contributes :math:`P(Y \ge y) = \Phi(-(y - \mu) / \sigma)` and
    ``censor == -1`` ("at most y") contributes :math:`P(Y \le y) = \Phi((y - \mu)/\sigma)`.
    Samples are draws of the uncensored response.

    Parameters
    ----------
    loc, scale : Tensor of shape (n_obs,)
        Mean and sd of the uncensored response.
    censor : Tensor of shape (n_obs,)
        Censoring indicator in {-1, 0, +1}.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = True

    def __init__(
        self, loc: torch.Tensor, scale: torch.Tensor, censor: torch.Tensor, validate_args=None
    ) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.censor = censor.to(self.loc.dtype).expand_as(self.loc)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # noqa: D102
        shape = torch.Size(batch_shape)
        return CensoredNormal(
            self.loc.expand(shape), self.scale.expand(shape), self.censor.expand(shape)
        )

    def rsample(self, sample_shape=()) -> torch.Tensor:  # noqa: D102
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + self.scale * eps

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:  # noqa: D102
        z = (value - self.loc) / self.scale
        exact = -0.5 * z**2 - torch.log(self.scale) - 0.9189385332046727
        upper = torch.special.log_ndtr(-z)
        lower = torch.special.log_ndtr(z)
        return torch.where(self.censor > 0, upper, torch.where(self.censor < 0, lower, exact))

    @property
    def mean(self) -> torch.Tensor:  # noqa: D102
        return self.loc

    @property
    def variance(self) -> torch.Tensor:  # noqa: D102
        return self.scale**2


def gaussian_likelihood(
    loc: torch.Tensor, scale: torch.Tensor, censor: torch.Tensor | None
) -> dist.TorchDistribution:
    """Return a Normal, or a :class:`CensoredNormal` when censoring indicators are given."""
    if censor is None:
        return dist.Normal(loc, scale)
    return CensoredNormal(loc, scale, censor)
