"""Search spaces of models and fit settings, and how trials sample them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

__all__ = [
    "as_distribution",
    "contains",
    "decode",
    "default_search_space",
    "encode",
    "fit_search_space",
    "model_class",
    "model_defaults",
    "search_space",
    "suggest",
]

#: Integer arguments the generic search space treats as ranks.
_RANK_NAMES = ("rank", "n_latents", "factors", "k")


def model_class(model: str | type) -> type:
    """Return the model class of a registered name (or the class itself)."""
    from mtl4c_prob.models import MODELS, ProbabilisticModel

    if isinstance(model, type) and issubclass(model, ProbabilisticModel):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {list(MODELS)}")
    return MODELS[model]


def model_defaults(cls: type) -> dict[str, Any]:
    """Return the constructor arguments of ``cls`` that have defaults, with those defaults."""
    sig = inspect.signature(cls.__init__)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }


def default_search_space(model: str | type) -> dict[str, BaseDistribution]:
    """Search space read from a model's constructor signature.

    The fallback for models that declare none: every positive float argument whose name
    ends in ``_scale``, ``_spread`` or ``_loc`` (prior scales and locations) ranges
    log-uniformly over a factor of 5 either side of its default; integer ranks
    (``rank``, ``*_rank``, ``n_latents``, ``factors``, ``k``) from a quarter to twice
    the default on a log scale; ``kernel`` and ``composite`` over the registered kernel
    families and compositions.

    Parameters
    ----------
    model : str or model class
        A registered model name or a :class:`~mtl4c_prob.models.ProbabilisticModel`
        subclass.

    Returns
    -------
    dict of str to optuna distribution
        Constructor argument name -> distribution.
    """
    cls = model_class(model)
    space: dict[str, BaseDistribution] = {}
    for name, default in model_defaults(cls).items():
        if isinstance(default, bool) or default is None:
            continue
        if (
            isinstance(default, float)
            and default > 0
            and name.endswith(("_scale", "_spread", "_loc"))
        ):
            space[name] = FloatDistribution(default / 5, default * 5, log=True)
        elif isinstance(default, int) and (name in _RANK_NAMES or name.endswith("_rank")):
            low, high = max(1, default // 4), max(2, default * 2)
            space[name] = IntDistribution(low, high, log=True)
        elif name in ("kernel", "composite") and isinstance(default, str):
            space[name] = CategoricalDistribution(_kernel_choices(name, default))
    return space


def _kernel_choices(name: str, default: str) -> tuple[str, ...]:
    try:
        from mtl4c_prob.models._kernels import COMPOSITES, KERNELS
    except ImportError:
        return (default,)
    return tuple(KERNELS) if name == "kernel" else tuple(COMPOSITES)


def as_distribution(name: str, spec: Any) -> BaseDistribution:
    """Turn a declared dimension into an Optuna distribution.

    ``spec`` is a distribution, or a tuple: ``("float", low, high[, "log"])``,
    ``("int", low, high[, "log" | step])`` or ``("categorical", choices)``.

    Raises
    ------
    ValueError
        When the tuple does not follow that form (the message names the dimension).
    """
    if isinstance(spec, BaseDistribution):
        return spec
    form = "('float'|'int', low, high[, 'log'|step]) or ('categorical', choices)"
    if not isinstance(spec, (tuple, list)) or not spec:
        raise ValueError(f"search dimension {name!r}: expected {form}, got {spec!r}")
    kind, *rest = spec
    try:
        if kind == "categorical" and len(rest) == 1:
            return CategoricalDistribution(tuple(rest[0]))
        if kind in ("float", "int") and len(rest) in (2, 3):
            low, high = rest[:2]
            extra = rest[2] if len(rest) == 3 else None
            log = extra == "log"
            if kind == "float":
                step = None if extra in (None, "log") else float(extra)
                return FloatDistribution(float(low), float(high), log=log, step=step)
            step = 1 if extra in (None, "log") else int(extra)
            return IntDistribution(int(low), int(high), log=log, step=step)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"search dimension {name!r} = {spec!r}: {exc}") from exc
    raise ValueError(f"search dimension {name!r}: expected {form}, got {spec!r}")


def search_space(model: str | type) -> dict[str, BaseDistribution]:
    """Search space over a model's constructor arguments (priors, ranks, kernels).

    A model declares its space as the class attribute ``search_space``: argument name
    -> dimension, in the forms :func:`as_distribution` reads (so model modules need not
    import Optuna). A tuple-valued argument such as hidden-layer widths is searched over
    strings like ``"64-32"``. A subclass inherits its parent's space, less the
    arguments it does not take; models that declare none get
    :func:`default_search_space`.

    Raises
    ------
    ValueError
        When a class's own declaration names an argument its constructor lacks.
    """
    cls = model_class(model)
    declared = getattr(cls, "search_space", None)
    if declared is None:
        return default_search_space(cls)
    accepted = model_defaults(cls)
    unknown = sorted(set(declared) - set(accepted))
    if unknown and "search_space" in vars(cls):
        raise ValueError(f"{cls.__name__}.search_space names unknown arguments {unknown}")
    return {k: as_distribution(k, v) for k, v in declared.items() if k in accepted}


def fit_search_space(model: str | type) -> dict[str, BaseDistribution]:
    """Search space over the SVI settings ``lr`` and ``steps``.

    Around the model's ``fit_defaults`` (or the :class:`~mtl4c_prob.inference.SVIConfig`
    defaults): the learning rate log-uniformly within a factor of 3, the number of steps
    from half to 1.5 times the default in multiples of 50. A model may declare its own
    as the class attribute ``fit_search_space`` (same forms as ``search_space``).
    """
    from mtl4c_prob.inference import SVIConfig

    cls = model_class(model)
    declared = getattr(cls, "fit_search_space", None)
    if declared is not None:
        return {k: as_distribution(k, v) for k, v in declared.items()}
    base = SVIConfig()
    lr = float(cls.fit_defaults.get("lr", base.lr))
    steps = int(cls.fit_defaults.get("steps", base.steps))
    low = max(50, 50 * round(steps / 100))
    high = max(low + 50, 50 * round(steps * 1.5 / 50))
    return {
        "lr": FloatDistribution(lr / 3, lr * 3, log=True),
        "steps": IntDistribution(low, high, step=50),
    }


def encode(value: Any) -> Any:
    """Turn a constructor argument into a searchable value ((64, 32) -> "64-32")."""
    if isinstance(value, (list, tuple)):
        return "-".join(str(int(v)) for v in value)
    return value


def decode(defaults: Mapping[str, Any], name: str, value: Any) -> Any:
    """Turn a searched value into a constructor argument ("64-32" -> (64, 32))."""
    if isinstance(value, str) and isinstance(defaults.get(name), (list, tuple)):
        return tuple(int(v) for v in value.split("-") if v)
    return value


def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` lies in ``dist`` (a default outside a declared range does not)."""
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def suggest(trial: optuna.Trial, space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Sample every dimension of ``space`` in ``trial``, under its own name."""
    values = {}
    for name, dist in space.items():
        if isinstance(dist, FloatDistribution):
            values[name] = trial.suggest_float(
                name, dist.low, dist.high, log=dist.log, step=dist.step
            )
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        elif isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        else:
            raise TypeError(f"unsupported distribution {type(dist).__name__} for {name!r}")
    return values
