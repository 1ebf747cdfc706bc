"""Warning and error classes of mtl4c_prob."""

from __future__ import annotations

__all__ = [
    "ConvergenceWarning",
    "DataError",
    "DataWarning",
    "Mtl4cWarning",
    "NumericalWarning",
]


class Mtl4cWarning(UserWarning):
    """Base class of every warning mtl4c_prob emits."""


class ConvergenceWarning(Mtl4cWarning):
    """An optimisation stopped before it converged."""


class NumericalWarning(Mtl4cWarning):
    """A numerical safeguard (jitter, clamping) was applied."""


class DataWarning(Mtl4cWarning):
    """Input rows were dropped, merged or masked."""


class DataError(ValueError):
    """Input data is malformed: the message names the file, row or column at fault."""
