"""Warning and error classes of mtl4c_prob."""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "DataWarning",
    "DiagnosticWarning",
    "Mtl4cWarning",
    "NumericalWarning",
    "warn_external",
]


class Mtl4cWarning(UserWarning):
    """Base class of every warning mtl4c_prob emits."""


class ConvergenceWarning(Mtl4cWarning):
    """An optimisation stopped before it converged."""


class NumericalWarning(Mtl4cWarning):
    """A numerical safeguard (jitter, clamping) was applied."""


class DiagnosticWarning(Mtl4cWarning):
    """A model-criticism diagnostic (Pareto k, WAIC variance, R-hat) flags a problem."""


class DataWarning(Mtl4cWarning):
    """Input rows were dropped, merged or masked."""


class DataError(ValueError):
    """Input data is malformed: the message names the file, row or column at fault."""


def warn_external(message: str, category: type[Warning]) -> None:
    """Warn, attributing the warning to the first caller outside mtl4c_prob.

    A fixed ``stacklevel`` is right for one entry point only; walking out of the package
    points every warning at the user's line, whichever public function they called.
    """
    import inspect
    import warnings

    frame, level = inspect.currentframe(), 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("mtl4c_prob"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
