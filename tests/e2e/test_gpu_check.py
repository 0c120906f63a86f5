"""The device-check tool runs end to end (on the CPU, with small networks) and reports every figure."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


def test_gpu_check_smoke_run_on_cpu_reports_throughput_and_bf16_against_fp32(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--small", "--sequences", "40",
                             "--agreement-sequences", "30", "--json", str(out)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert figures["device"]["default_precision"] == "fp32" and figures["device"]["native_bf16"] is False
    for stage in ("dnabert", "esm"):
        assert figures[stage]["sequences"] == 40
        assert figures[stage]["sequences_per_s"] > 0
        assert figures[stage]["precision"] == "fp32"
    compared = figures["bf16_vs_fp32"]
    assert compared["sequences"] == 30
    assert 0.5 < compared["label_agreement"] <= 1.0
    assert all(0.9 < cosine < 1.0 for cosine in compared["min_cosine"].values())
