"""Metrics, calibration and reports."""

from __future__ import annotations

from mtl4c_prob.evaluation.calibration import (
    PITHistogram,
    calibration_table,
    coverage_table,
    interval_score,
    pit_histogram,
    pit_values,
)
from mtl4c_prob.evaluation.diagnostics import (
    compare,
    load_inference_data,
    loo,
    loo_pit,
    to_inference_data,
    waic,
    write_inference_data,
)
from mtl4c_prob.evaluation.metrics import evaluate, evaluate_frame
from mtl4c_prob.evaluation.recalibration import Recalibrator, recalibration_report
from mtl4c_prob.evaluation.report import build_report, write_report

__all__ = [
    "PITHistogram",
    "Recalibrator",
    "build_report",
    "calibration_table",
    "compare",
    "coverage_table",
    "evaluate",
    "evaluate_frame",
    "interval_score",
    "load_inference_data",
    "loo",
    "loo_pit",
    "pit_histogram",
    "pit_values",
    "recalibration_report",
    "to_inference_data",
    "waic",
    "write_inference_data",
    "write_report",
]
