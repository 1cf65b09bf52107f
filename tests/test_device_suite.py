"""The device benchmark suite runs end to end on the CPU in its --quick form (as in CI)."""

import json
import subprocess
import sys

import pytest

from tests.support.server_process import REPO


@pytest.mark.slow
def test_quick_suite_measures_every_section(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "bench" / "device_suite.py"), "--quick",
                          "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "device_suite.json").read_text())
    rows = result["rows"]
    assert result["quick"] and result["environment"]["device"] == "cpu"
    assert not [r for r in rows if "error" in r]
    timed = {(r["section"], r["name"]) for r in rows if r.get("ms", 0) > 0}
    for wanted in [("generators", "StyleGAN2-F"), ("generators", "StyleGAN3-T"),
                   ("generators", "StyleGAN3-R"), ("generators", "RigNet"),
                   ("diffusionrig", "UNet step"), ("diffusionrig", "DDIM-20"),
                   ("diffusionrig", "DPM-Solver++ 10"), ("diffusionrig", "distilled 2-step"),
                   ("diffusionrig", "first preview (DDIM step 1)"), ("backends", "preview"),
                   ("backends", "stylerig server round trip")]:
        assert wanted in timed, wanted
    skipped = {r["section"] for r in rows if "skipped" in r}
    assert skipped == {"compiled", "official"}  # compiling and official code: device only
    table = (tmp_path / "device_suite.md").read_text()
    assert "| section | what | config | ms (p50) |" in table
    assert table.count("\n| ") == len(rows) + 1
