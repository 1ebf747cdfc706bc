"""Diagnostics report of fit folders, and the report and compare commands."""

import base64
import re
import shutil

import pandas as pd
import pytest

from mtl4c_prob.cli import main
from mtl4c_prob.evaluation.folder_report import FitFolder, build_folder_report
from mtl4c_prob.exceptions import DataError

SECTIONS = [
    "summary",
    "elbo",
    "predicted-vs-observed",
    "ppc",
    "loo-pit",
    "calibration",
    "metrics",
    "forest",
    "task-correlation",
    "loo-compare",
]


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    root = tmp_path_factory.mktemp("fits")
    for model in ("mf", "mean"):
        code = main(
            ["run", "--model", model, "--steps", "120", "--idata-draws", "40", "-q",
             "--out", str(root / model)]
        )  # fmt: skip
        assert code == 0
    return root


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r'<section><h2 id="([^"]+)">', text)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _images(body: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', body)]


def test_fit_folder_holds_the_export(fits):
    folder = FitFolder.read(fits / "mf")
    assert folder.idata is not None and folder.predictions is not None and folder.losses
    assert folder.data_summary["tasks"] == 3
    assert folder.idata.posterior.sizes["draw"] == 20


def test_two_model_report_has_every_section_and_figure(fits, tmp_path):
    out = tmp_path / "both.html"
    assert main(["report", str(fits / "mf"), str(fits / "mean"), "--out", str(out)]) == 0
    text = out.read_text()
    sections = _sections(text)
    assert list(sections) == SECTIONS
    for name in ("elbo", "predicted-vs-observed", "ppc", "loo-pit", "calibration", "forest"):
        images = _images(sections[name])
        assert images and all(img.startswith(b"\x89PNG") for img in images), name
    # One forest plot and one scatter figure per model; both models in the tables.
    assert len(_images(sections["forest"])) == 2
    assert len(_images(sections["predicted-vs-observed"])) == 2
    for name in ("mf (mf)", "mean (mean)"):
        assert name in sections["loo-compare"] and name in sections["calibration"]
    assert "elpd_loo" in sections["loo-compare"]
    assert "Per drug" in sections["metrics"]
    assert "not available" in sections["task-correlation"]
    assert "http" not in text.split("<footer>")[0].replace("https://", "")  # offline page


def test_report_says_what_is_missing(fits, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(fits / "mf", partial)
    (partial / "idata.nc").unlink()
    text = build_folder_report([partial])
    sections = _sections(text)
    assert list(sections) == SECTIONS
    for name in ("ppc", "loo-pit", "forest"):
        assert "not available" in sections[name], name
    assert "needs two or more" in sections["loo-compare"]
    assert _images(sections["calibration"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="fit folder"):
        build_folder_report([tmp_path / "empty"])
    with pytest.raises(ValueError, match="at least one"):
        build_folder_report([])


def test_compare_command(fits, tmp_path, capsys):
    out = tmp_path / "loo.csv"
    code = main(["compare", str(fits / "mf"), str(fits / "mean"), "--out", str(out)])
    assert code == 0
    table = pd.read_csv(out, index_col=0)
    assert set(table.index) == {"mf", "mean"} and "elpd_loo" in table.columns
    assert table.loc["mf", "rank"] == 0  # the factorisation fits the planted factors
    assert main(["compare", str(fits / "mf")]) == 0
    assert "elpd" in capsys.readouterr().out


def test_report_command_errors(fits, tmp_path, capsys):
    assert main(["report", str(fits / "mf"), "--out", str(tmp_path / "r.txt")]) == 2
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert ".html" in err and "does not exist" in err
    assert not (tmp_path / "r.html").exists()
