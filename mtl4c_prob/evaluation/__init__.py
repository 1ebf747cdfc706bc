"""Metrics, calibration and reports."""

from __future__ import annotations

from mtl4c_prob.evaluation.metrics import evaluate, evaluate_frame
from mtl4c_prob.evaluation.report import build_report, write_report

__all__ = ["build_report", "evaluate", "evaluate_frame", "write_report"]
