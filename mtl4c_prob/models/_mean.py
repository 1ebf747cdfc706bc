"""Mean-effects baseline: task offset plus cell and drug effects, with priors."""

from __future__ import annotations

from mtl4c_prob.models._mf import BayesianMF

__all__ = ["MeanEffects"]


class MeanEffects(BayesianMF):
    r"""Additive mean-effects model, the honest floor every other model must beat.

    Status: stable.

    Generative story (responses standardised per task): the Bayesian MF of
    :class:`~mtl4c_prob.models.BayesianMF` without the interaction term,

    .. math::

        y_{tcd} \sim N(m_t + b_{tc} + b_{td}, \sigma_{tcd}^2),

    with hierarchical normal cell and drug effects (task-specific deviations when
    multitask), optional feature-linear means for the effects (so unseen cells get
    feature-based effects) and the same per-task, per-drug and per-cell noise model.

    Parameters
    ----------
    multitask : bool, default=True
        Share effects across tasks with learned task deviations; False fits per task.
    cell_features, drug_features : bool, optional
        Use side features for the effect means (None: when the data carry them).
    bias_scale, offset_scale, task_scale, feature_scale, noise, noise_scale, noise_spread
        As for :class:`~mtl4c_prob.models.BayesianMF`.
    """

    name = "mean"
    #: Ranges searched by ``mtl4c-prob tune`` (each holds the default).
    search_space = {
        "bias_scale": ("float", 0.1, 5.0, "log"),
        "task_scale": ("float", 0.03, 1.5, "log"),
        "feature_scale": ("float", 0.1, 5.0, "log"),
        "noise": ("categorical", ("task", "drug", "cell-drug")),
        "noise_spread": ("float", 0.1, 2.0, "log"),
    }

    def __init__(
        self,
        *,
        multitask: bool = True,
        cell_features: bool | None = None,
        drug_features: bool | None = None,
        bias_scale: float = 1.0,
        offset_scale: float = 1.0,
        task_scale: float = 0.3,
        feature_scale: float = 1.0,
        noise: str = "cell-drug",
        noise_scale: float = 1.0,
        noise_spread: float = 0.5,
    ) -> None:
        super().__init__(
            rank=1,
            multitask=multitask,
            cell_features=cell_features,
            drug_features=drug_features,
            bias_scale=bias_scale,
            offset_scale=offset_scale,
            task_scale=task_scale,
            feature_scale=feature_scale,
            noise=noise,
            noise_scale=noise_scale,
            noise_spread=noise_spread,
        )
        self.rank = 0
