"""Metrics, calibration and reports."""

from __future__ import annotations

from mtl4c_prob.evaluation.diagnostics import (
    compare,
    load_inference_data,
    loo,
    to_inference_data,
    waic,
    write_inference_data,
)
from mtl4c_prob.evaluation.metrics import evaluate, evaluate_frame
from mtl4c_prob.evaluation.report import build_report, write_report

__all__ = [
    "build_report",
    "compare",
    "evaluate",
    "evaluate_frame",
    "load_inference_data",
    "loo",
    "to_inference_data",
    "waic",
    "write_inference_data",
    "write_report",
]
