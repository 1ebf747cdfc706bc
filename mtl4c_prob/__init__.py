"""mtl4c_prob: probabilistic multitask models for cancer drug-response prediction."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
