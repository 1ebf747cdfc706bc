"""Time the diagnostics report of three fitted models on GDSC2 leave-pairs-out.

Usage (from the repository root)::

    python benchmarks/gdsc_report.py [--models mf mean nmf] [--work DIR]

Fits each model with ``mtl4c-prob fit`` (GDSC2 ln IC50, 80/20 leave pairs out, seed 0;
each fit folder gets its ``idata.nc`` export of 10,000 training rows and 200 draws), then
times ``mtl4c-prob report`` over the three folders, the figure of issue 5 (under 60 s on
2 CPU cores). Prints the fit and export times from each ``metrics.json`` and the report
time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mf", "mean", "nmf"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=None, help="folder for the fits")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mtl4c-report-"))
    folders = []
    for name in args.models:
        out = work / name
        if not (out / "idata.nc").is_file():
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "mtl4c_prob.cli", "fit", "-q", "--data",
                 str(args.data / "GDSC2_IC50.csv"), "--model", name, "--split", "lpo",
                 "--seed", "0", "--out", str(out)],
                check=True,
            )  # fmt: skip
            total = time.perf_counter() - start
            info = json.loads((out / "metrics.json").read_text())["info"]
            print(f"{name}: fit {info['fit_seconds']:.1f} s, whole command {total:.1f} s")
        folders.append(str(out))
    start = time.perf_counter()
    html = work / "report.html"
    subprocess.run(
        [sys.executable, "-m", "mtl4c_prob.cli", "report", *folders, "--out", str(html)],
        check=True,
    )
    seconds = time.perf_counter() - start
    size = html.stat().st_size / 1e6
    print(f"report of {len(folders)} models: {seconds:.1f} s (whole command), {size:.1f} MB")


if __name__ == "__main__":
    main()
