"""benchmarks/gpu_check.sh runs end to end in its quick CPU mode, so the GPU check cannot rot between GPU loans:
every part runs at tiny size or says why it was skipped, and the log and summary it leaves are complete.
No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_ROWS = ("bench_s2_compiled", "bench_s2_eager", "bench_sample_nfe50", "bench_b2_compiled", "bench_b2_eager")


def test_quick_cpu_run_passes_and_reports_what_it_skipped(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()  # a wheel folder whose packages all import already: nothing may be installed
    env = {
        **os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_QUICK": "1", "GPU_CHECK_BUDGET_S": "240",
        "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_WHEELS": str(wheels), "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "run"], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["digits_samples.png", "gpu_check.log", "summary.json"]
    log = (out / "gpu_check.log").read_text()
    assert log == proc.stdout  # everything printed is in the log, and nothing else
    assert "every carried package imports already: installing nothing" in log
    assert log.rstrip().endswith(f"OK; wrote {out}/summary.json and {out}/gpu_check.log")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "quick-cpu" and summary["ok"] is True and summary["installed_wheels"] == []
    assert summary["env"]["cuda_available"] is False and summary["env"]["torch"]
    parts = {p["name"]: p for p in summary["parts"]}
    for name in ("train", "resume", "sample", "bench_tiny"):
        assert parts[name]["status"] == "ok" and parts[name]["rc"] == 0, parts[name]
        assert 0 < parts[name]["seconds"] <= parts[name]["limit_s"] + 10

    # 1. the GPU tests: collected, every one skipped on the CPU, and the summary says so
    assert parts["tests"]["status"] == "skipped" and "CUDA" in parts["tests"]["note"], parts["tests"]
    cases = summary["tests"]["cases"]
    assert len(cases) >= 6 and summary["tests"]["skipped"] == len(cases)
    assert all(c["outcome"] == "skipped" and "CUDA" in c["message"] for c in cases)

    # 2. train, resume from the checkpoint, sample
    train = summary["train"]
    assert train["final_step"] == 30 and train["exit_codes"] == {"train": 0, "resume": 0, "sample": 0}
    assert math.isfinite(train["first_loss"]) and math.isfinite(train["final_loss"]) and train["final_loss"] > 0
    assert train["samples"] == 10  # one per class

    # 3. the tiny benchmark row ran; every CUDA row is listed as skipped, with the reason
    rows = summary["bench"]["train"]
    assert [r["run"] for r in rows] == ["tiny", "meanflow"] and all(r["img_per_s"] > 0 for r in rows)
    assert rows[0]["compiled"] is False
    assert sorted((s["nfe"], s["cfg_scale"]) for s in summary["bench"]["sample"]) == [(1, 1.0), (1, 4.0)]
    assert summary["bench"]["results"]["tiny"]["device"]["type"] == "cpu"
    for name in CUDA_ROWS:
        assert parts[name]["status"] == "skipped" and "needs CUDA" in parts[name]["note"], parts[name]
        assert f"skip {name}: needs CUDA" in log

    # 4. MeanFlow: measured when the benchmark has --objective, else skipped with the reason
    meanflow = parts["bench_meanflow"]
    assert meanflow["status"] == "ok" and meanflow["rc"] == 0, meanflow  # the benchmark has --objective meanflow
