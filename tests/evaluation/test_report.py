"""Tests of mtl4c_prob.evaluation.report."""

from __future__ import annotations

import base64
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest

from mtl4c_prob.evaluation import report
from mtl4c_prob.evaluation.report import (
    ReportSection,
    build_report,
    render_report,
    write_report,
)
from mtl4c_prob.exceptions import DataWarning

SECTION_IDS = ["summary", "elbo", "predicted-vs-observed", "calibration", "metrics"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL_TASK = "<b>x</b>"


def make_predictions(seed=0, n_per_task=150):
    rng = np.random.default_rng(seed)
    frames = []
    for task in ["GDSC1", EVIL_TASK]:
        mean = rng.normal(size=n_per_task)
        sd = rng.uniform(0.5, 1.5, size=n_per_task)
        y = rng.normal(mean, sd)
        frames.append(
            pd.DataFrame(
                {
                    "task": task,
                    "cell": [f"cell{i}" for i in range(n_per_task)],
                    "drug": rng.choice(["d1", "d2", "d3"], size=n_per_task),
                    "y": y,
                    "mean": mean,
                    "sd": sd,
                    "lower": mean - 1.6449 * sd,
                    "upper": mean + 1.6449 * sd,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module", autouse=True)
def block_pyplot():
    # every report in this module is built with pyplot unimportable, proving that the
    # report never touches pyplot's global state (backend, figure registry)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib.pyplot", None)
        yield


@pytest.fixture(scope="module")
def predictions():
    return make_predictions()


@pytest.fixture(scope="module")
def metrics():
    return {
        "overall": {"n": 300, "rmse": 1.2345678, "r2": float("nan"), "coverage_90": 0.9},
        "per_task": {
            "GDSC1": {"n": 150, "rmse": 1.1, "crps": 0.61234},
            EVIL_TASK: {"n": 150, "rmse": 1.3},
        },
    }


@pytest.fixture(scope="module")
def full_html(predictions, metrics):
    return build_report(
        predictions,
        metrics,
        loss_history=list(np.linspace(200.0, 20.0, 300)),
        val_loss_history=[(100, 90.0), (200, 60.0), (300, 40.0)],
        settings={"model": "lmc", "steps": 300, "device": "cpu", "seed": 0, "fit_s": 1.23456},
        data_summary={"tasks": 2, "cells": 150, "drugs": 3, "density": 0.123456},
    )


def images(html_text):
    return [base64.b64decode(data, validate=True) for data in IMG_RE.findall(html_text)]


def test_every_section_has_an_h2_with_its_id(full_html):
    for section_id in SECTION_IDS:
        assert f'<h2 id="{section_id}">' in full_html
    assert full_html.startswith("<!DOCTYPE html>")
    assert "<style>" in full_html


def test_images_are_embedded_pngs(full_html):
    # loss trace, predicted-vs-observed grid and calibration figure
    pngs = images(full_html)
    assert len(pngs) == 3
    assert full_html.count("<img ") == 3
    for png in pngs:
        assert png.startswith(PNG_SIGNATURE)
        assert len(png) > 1000


def test_no_external_resources_or_scripts(full_html):
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", full_html, flags=re.I)
    assert links
    for link in links:
        assert link.startswith(("data:", "#")), link
    assert "<script" not in full_html.lower()
    assert "<link" not in full_html.lower()


@pytest.fixture(scope="module")
def bare_html(predictions, metrics):
    return build_report(predictions, metrics, title="<i>t</i>", settings={"<s>": "<u>"})


def test_user_strings_are_escaped(bare_html):
    html_text = bare_html
    assert EVIL_TASK not in html_text
    assert "&lt;b&gt;x&lt;/b&gt;" in html_text
    assert "<i>t</i>" not in html_text and "&lt;i&gt;t&lt;/i&gt;" in html_text
    assert "<s>" not in html_text and "<u>" not in html_text


def test_missing_loss_history_says_not_available(bare_html):
    html_text = bare_html
    elbo = html_text.split('<h2 id="elbo">')[1].split("</section>")[0]
    assert "not available" in elbo
    assert "<img" not in elbo
    assert len(images(html_text)) == 2


def test_non_positive_losses_use_symlog_without_failing(predictions, metrics):
    html_text = build_report(predictions, metrics, loss_history=[5.0, -1.0, -3.0, float("nan")])
    assert len(images(html_text)) == 3
    assert "Loss on a symlog scale" in html_text
    assert "1 non-finite value(s) not drawn" in html_text


def test_positive_losses_use_log_scale(full_html):
    assert "Loss on a log scale" in full_html


def test_metrics_and_settings_tables_are_formatted(full_html):
    metrics_html = full_html.split('<h2 id="metrics">')[1].split("</section>")[0]
    assert "<th>scope</th><th>n</th><th>rmse</th><th>r2</th><th>coverage_90</th>" in metrics_html
    assert "<td>1.235</td>" in metrics_html  # 4 significant digits
    assert "<td>0.6123</td>" in metrics_html
    assert "<td>n/a</td>" in metrics_html  # NaN r2 and metrics a task lacks
    assert metrics_html.count("<tr>") == 4  # header, overall, two tasks
    assert "<td>fit_s</td><td>1.235</td>" in full_html
    assert "<td>density</td><td>0.1235</td>" in full_html


def test_footer_has_version_and_timestamp(full_html):
    import mtl4c_prob

    footer = full_html.split("<footer>")[1]
    assert f"mtl4c_prob {mtl4c_prob.__version__}" in footer
    assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} UTC", footer)


def test_subsample_is_seeded(predictions, metrics, bare_html):
    first = images(bare_html)  # seed=0 by default; title and settings do not enter figures
    again = images(build_report(predictions, metrics, seed=0))
    other = images(build_report(predictions, metrics, seed=4))
    assert first == again
    assert first[0] != other[0]  # the bars of another subsample differ
    assert first[1] == other[1]  # calibration does not depend on the seed


def test_empirical_coverage_matches_hand_count():
    y = np.array([0.0, 1.0, 2.0])
    # z(0.5) = 0.674 covers only |y - mean| = 0; z(0.95) = 1.960 covers 0 and 1
    coverage = report._empirical_coverage(y, np.zeros(3), np.ones(3), np.array([0.5, 0.95]))
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3])


def test_calibrated_gaussian_is_calibrated():
    rng = np.random.default_rng(1)
    mean, sd = rng.normal(size=20_000), rng.uniform(0.2, 2.0, size=20_000)
    y = rng.normal(mean, sd)
    coverage = report._empirical_coverage(y, mean, sd, report._NOMINAL_LEVELS)
    # binomial sd of a coverage is at most sqrt(0.25 / 20000) = 0.0035; 0.02 is ~6 sd
    np.testing.assert_allclose(coverage, report._NOMINAL_LEVELS, atol=0.02)
    counts = np.histogram(report._pit_values(y, mean, sd), bins=10, range=(0, 1))[0]
    # each bin expects 2000 with binomial sd 42; 250 is ~6 sd
    np.testing.assert_allclose(counts, 2000, atol=250)


def test_write_report_creates_parents_and_leaves_no_temp(tmp_path, predictions, metrics):
    target = tmp_path / "new" / "sub" / "report.html"
    written = write_report(target, predictions, metrics, title="written")
    assert written == target
    assert target.is_file()
    text = target.read_text(encoding="utf-8")
    assert "<title>written</title>" in text
    assert all(f'id="{s}"' in text for s in SECTION_IDS)
    assert os.listdir(target.parent) == ["report.html"]


def test_write_report_is_atomic(tmp_path, predictions, metrics, monkeypatch):
    target = tmp_path / "report.html"
    target.write_text("old report", encoding="utf-8")
    monkeypatch.setattr(report, "build_report", lambda *args, **kwargs: "new report")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(target, predictions, metrics)
    assert target.read_text(encoding="utf-8") == "old report"
    assert os.listdir(tmp_path) == ["report.html"]


def test_bad_rows_are_dropped_with_a_warning(predictions, metrics):
    broken = predictions.copy()
    broken.loc[0, "y"] = np.nan
    broken.loc[1, "sd"] = 0.0
    with pytest.warns(DataWarning, match="2 of 300 prediction rows"):
        html_text = build_report(broken, metrics)
    assert "298 usable predictions over 2 task(s)" in html_text


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"predictions": "table"}, TypeError, "predictions must be a pandas.DataFrame, got str"),
        ({"drop": "sd"}, ValueError, r"lacks the columns \['sd'\]"),
        ({"level": 1.5}, ValueError, r"level must lie in \(0, 1\), got 1.5"),
        ({"metrics": [1.0]}, TypeError, "metrics must be a dict .* got list"),
        ({"metrics": {"overall": 3.0}}, TypeError, r"metrics\['overall'\] must be a dict"),
        ({"metrics": {"per_task": {"a": 1.0}}}, TypeError, r"\['per_task'\]\['a'\] must be"),
        ({"val_loss_history": [(1, 2, 3)]}, ValueError, r"shape \(1, 3\)"),
        ({"all_nan": True}, ValueError, "no usable rows"),
    ],
    ids=["frame", "column", "level", "metrics", "overall", "per-task", "val", "nan"],
)
def test_bad_input_raises(predictions, metrics, kwargs, error, match):
    kwargs = dict(kwargs)
    frame = kwargs.pop("predictions", predictions)
    if "drop" in kwargs:
        frame = frame.drop(columns=kwargs.pop("drop"))
    if kwargs.pop("all_nan", False):
        frame = frame.assign(y=np.nan)
    metrics = kwargs.pop("metrics", metrics)
    if "val_loss_history" in kwargs:
        kwargs["loss_history"] = [1.0, 2.0]
    with pytest.raises(error, match=match):
        build_report(frame, metrics, **kwargs)


def test_sections_validate_anchors():
    with pytest.raises(ValueError, match="anchor='bad id' is not a valid section id"):
        ReportSection("bad id", "Bad", "")
    section = ReportSection("extra", "Extra <1>", "<p>body</p>")
    with pytest.raises(ValueError, match=r"duplicate anchors \['extra'\]"):
        render_report([section, section])
    page = render_report([section], title="custom")
    assert '<h2 id="extra">Extra &lt;1&gt;</h2>' in page
    assert '<a href="#extra">' in page


def test_pyplot_is_never_imported(full_html):
    # full_html was built while importing pyplot raised ImportError (see block_pyplot);
    # also check that no pyplot module object was bound when report.py was imported
    assert full_html
    assert sys.modules["matplotlib.pyplot"] is None
    bound = [getattr(value, "__name__", None) for value in vars(report).values()]
    assert "matplotlib.pyplot" not in bound
