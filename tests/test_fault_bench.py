"""benchmarks/fault_bench.py as it is run: ``--quick`` on the fast categories prints the JSON
report, and every case of the categories already fixed is handled."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks" / "fault_bench.py"
FIXED = ("damaged_slides", "traces", "manifests")


def test_quick_run_reports_every_category_asked_for_and_all_are_handled():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--only", ",".join(FIXED)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["quick"] is True and list(report["categories"]) == list(FIXED)
    for name in FIXED:
        cat = report["categories"][name]
        assert set(cat) >= {"tried", "handled", "percent", "cases"}
        assert cat["tried"] == len(cat["cases"]) >= 3
        assert all(set(c) == {"case", "handled", "detail"} for c in cat["cases"])
        failed = [c for c in cat["cases"] if not c["handled"]]
        assert not failed, failed
        assert cat["handled"] == cat["tried"] and cat["percent"] == 100.0
    assert report["total"]["tried"] == sum(report["categories"][n]["tried"] for n in FIXED)
    names = [c["case"] for c in report["categories"]["manifests"]["cases"]]
    assert "slide in two splits" in names and "extra column (warning)" in names
    names = [c["case"] for c in report["categories"]["traces"]["cases"]]
    assert {"NaN", "ragged map", "deep nesting", "garbage", "probs/classes mismatch"} <= set(names)


def test_an_unknown_category_is_refused():
    proc = subprocess.run([sys.executable, str(BENCH), "--only", "nonsense"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown categories nonsense" in proc.stderr
