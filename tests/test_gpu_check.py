"""benchmarks/gpu_check.py (and the gpu_runner.py and gpu_summary.py it imports), without a GPU and without
re-running what tests/test_train.py and tests/test_benchmark.py already run: the timeout handling on small fake
commands, the plan of parts (every command parses with its script's own flags), the summary from a fake work
folder, the wheel install, and one short real run of the `tests` part end to end. No timing is asserted."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check, gpu_runner, gpu_summary
from benchmarks.gpu_check import child_env, install_wheels, plan, wheel_key
from benchmarks.gpu_runner import Log, Part, Runner
from benchmarks.gpu_summary import summarize

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CUDA_ROWS = ("bench_s2_compiled", "bench_s2_eager", "bench_sample_nfe50", "bench_b2_compiled", "bench_b2_eager")


def runner(tmp_path, budget_s=1000, **kwargs):
    return Runner(Log(tmp_path / "gpu_check.log"), tmp_path, budget_s, child_env(quick=True), **kwargs)


# ---------------------------------------------------------------------------------------------- running parts


def test_a_part_past_its_timeout_is_recorded_as_timed_out_and_its_output_kept(tmp_path):
    r = runner(tmp_path, min_step_s=0)
    slow = "import time; print('started', flush=True); time.sleep(120)"
    record = r.step(Part("slow", "bench", cap_s=1, argv=(PY, "-c", slow)))
    r.log.close()
    assert record == {
        "name": "slow",
        "status": "timeout",
        "rc": 124,
        "seconds": record["seconds"],
        "limit_s": 1,
        "note": "",
    }
    assert (tmp_path / "slow.log").read_text() == "started\n"
    log = (tmp_path / "gpu_check.log").read_text()
    assert "start slow (limit 1s): " in log and "started\n" in log and "end slow: timeout (exit 124)" in log


def test_a_part_that_ignores_sigterm_is_killed_with_its_children(tmp_path):
    r = runner(tmp_path, min_step_s=0, kill_after_s=0.5)
    record = r.step(Part("stubborn", "bench", cap_s=1, argv=("sh", "-c", "trap '' TERM; echo ready; sleep 120")))
    assert (record["status"], record["rc"]) == ("timeout", 137)
    assert (tmp_path / "stubborn.log").read_text() == "ready\n"


def test_what_a_finished_part_leaves_running_is_killed(tmp_path):
    status, rc = gpu_runner.run_command(["sh", "-c", "sleep 120 & echo $!"], 60, (out := []).append)
    assert (status, rc) == ("ok", 0)
    stat = Path(f"/proc/{int(out[0])}/stat")  # the sleep held the output pipe: returning means it is dying

    def state() -> str:  # R while it exits, Z once it has; gone once reaped
        try:
            return stat.read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return "gone"

    for _ in range(300):  # waits for the kernel to finish it, up to 30 s, rather than for the sleep's 120 s
        if state() in ("Z", "X", "gone"):
            break
        time.sleep(0.1)
    assert state() in ("Z", "X", "gone")


def test_failures_dependencies_and_the_budget(tmp_path):
    r = runner(tmp_path, budget_s=100, reserve_s=10, min_step_s=15)
    not_after_a_failure = lambda done: "" if done["fails"]["status"] == "ok" else "no"  # noqa: E731
    r.run(
        [
            Part(
                "fails", "train", 60, (PY, "-c", "import os; print(os.environ['OMP_WAIT_POLICY']); raise SystemExit(3)")
            ),
            Part("after", "train", 60, (PY, "-c", "pass"), needs=not_after_a_failure),
            Part("cuda_row", "bench", skip="needs CUDA"),
            Part("capped", "bench", 300, (PY, "-c", "pass")),  # limit: what is left of the 100 s, less the 10 s reserve
        ]
    )
    r.budget_s = 20  # then 20 - 10 s left, under the 15 s a part needs
    r.step(Part("late", "bench", 60, (PY, "-c", "pass")))
    r.log.close()
    parts = {p["name"]: p for p in r.records}
    assert list(parts) == ["fails", "after", "cuda_row", "capped", "late"]
    assert (parts["fails"]["status"], parts["fails"]["rc"]) == ("failed", 3)
    assert (tmp_path / "fails.log").read_text() == "PASSIVE\n"  # a CPU part's OpenMP threads do not spin
    assert parts["after"] == gpu_runner.part_record("after", "skipped", None, 0, None, "no")
    assert parts["cuda_row"]["status"] == "skipped" and parts["cuda_row"]["note"] == "needs CUDA"
    assert parts["capped"]["status"] == "ok" and 75 < parts["capped"]["limit_s"] <= 90
    assert parts["late"]["status"] == "skipped" and parts["late"]["note"].startswith("out of time: ")
    assert parts["late"]["note"].endswith("s of the 20s budget left")
    log = (tmp_path / "gpu_check.log").read_text()
    assert "skip after: no" in log and "skip cuda_row: needs CUDA" in log


# ---------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("quick", [True, False])
def test_the_plan_runs_the_same_parts_with_flags_the_scripts_accept(tmp_path, quick):
    import sampler
    import train
    from benchmarks import benchmark

    work, out = tmp_path / "work", tmp_path / "out"
    parts = plan(PY, work, out, quick)
    rows = (
        ("bench_tiny", *CUDA_ROWS, "bench_latent", "vae_decode")
        if quick
        else (CUDA_ROWS[0], "bench_xl2_latent", "vae_decode", *CUDA_ROWS[1:])
    )
    assert [p.name for p in parts] == ["tests", "train", "resume", "sample", *rows, "bench_meanflow"]
    assert {p.group for p in parts} == set(gpu_check.GROUPS) and not parts[-1].skip
    device = "cpu" if quick else "cuda"
    for p in parts:
        if p.skip:
            assert quick and p.name in CUDA_ROWS and p.skip.startswith("needs CUDA") and not p.argv
            continue
        assert p.argv[0] == PY and 0 < p.cap_s <= 120
        flags = list(p.argv[2:])
        if p.name == "tests":
            assert p.argv[1:6] == ("-m", "pytest", "-m", "gpu", "tests/test_gpu.py")
            assert f"--junitxml={work / 'pytest.xml'}" in flags
            continue
        if p.name == "vae_decode":
            assert p.argv[1:3] == ("-m", "benchmarks.vae_decode") and flags[flags.index("--device") + 1] == device
            continue
        if p.name.startswith("bench_"):
            flags = list(p.argv[3:])
            assert p.argv[1:3] == ("-m", "benchmarks.benchmark")
            cfg = benchmark.parse_args(flags)
            assert cfg.json == str(work / f"{p.name}.json")
            assert cfg.objective == ("meanflow" if p.name == "bench_meanflow" else "flow")
            assert cfg.compile == (
                "compiled" in p.name or (p.name in ("bench_meanflow", "bench_xl2_latent") and not quick)
            )
        else:
            cfg = (train if p.argv[1] == "train.py" else sampler).parse_args(flags)
        assert cfg.device == device
    steps = {p.name: train.parse_args(list(p.argv[2:])).steps for p in parts if p.argv[1:2] == ("train.py",)}
    assert steps == ({"train": 20, "resume": 30} if quick else {"train": 300, "resume": 500})
    resume = next(p for p in parts if p.name == "resume")
    assert resume.argv[-1] == "--resume" and train.parse_args(list(resume.argv[2:])).out == str(work / "digits")
    sample = sampler.parse_args(list(parts[3].argv[2:]))
    assert sample.ckpt == str(work / "digits" / "checkpoints" / "last.pt") and sample.each_class
    assert sample.out == str(out / "digits_samples.png") and sample.npz == str(work / "digits_samples.npz")

    # resume runs after a good first run only; sample needs the checkpoint
    assert resume.needs({}) == resume.needs({"train": {"status": "timeout"}}) != ""
    assert resume.needs({"train": {"status": "ok"}}) == ""
    assert parts[3].needs({}) == "no checkpoint to sample from"
    Path(sample.ckpt).parent.mkdir(parents=True)
    Path(sample.ckpt).touch()
    assert parts[3].needs({}) == ""


def test_the_modules_import_with_the_standard_library_alone():  # `prepare` runs before the project's packages are in
    code = "import sys, benchmarks.gpu_check; print(sorted(m for m in sys.modules if m.startswith('benchmarks')))"
    proc = subprocess.run([PY, "-S", "-E", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    modules = ["benchmarks", "benchmarks.gpu_check", "benchmarks.gpu_runner", "benchmarks.gpu_summary"]
    assert proc.returncode == 0 and proc.stdout == f"{modules}\n", proc.stderr


def test_child_env_on_the_cpu_has_no_cuda_one_thread_and_passive_openmp(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_env(quick=True, site=tmp_path)
    assert (env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("", "1", "PASSIVE")
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/elsewhere" and env["WANDB_MODE"] == "disabled"


# ---------------------------------------------------------------------------------------------- wheels


def test_wheels_are_matched_by_normalised_name_and_version_and_installed_only_when_missing(tmp_path, capsys):
    assert wheel_key("scikit_learn-1.7.2-cp312-cp312-manylinux_2_17_x86_64.whl") == "scikit_learn-1.7.2"
    assert wheel_key("POT-0.9.6.post1-cp312-cp312-manylinux2014_x86_64.whl") == "pot-0.9.6.post1"
    wheels, log = tmp_path / "wheels", Log()
    assert install_wheels(wheels, ["tqdm"], PY, log) == (None, [], True)  # no folder: nothing to install
    wheels.mkdir()
    assert install_wheels(wheels, [], PY, log) == (None, [], True)
    assert install_wheels(wheels, ["tqdm"], PY, log) == (None, [], False)  # missing, and no wheel for it
    said = capsys.readouterr().out
    assert "installing nothing" in said and "tqdm is missing and" in said and "has no tqdm 4.70.1 wheel" in said

    # a stand-in wheel of tqdm 4.70.1 (and one of another version, never chosen) installs into a new folder
    for version in ("4.70.1", "4.0.0"):
        info = f"tqdm-{version}.dist-info"
        with zipfile.ZipFile(wheels / f"tqdm-{version}-py3-none-any.whl", "w") as whl:
            whl.writestr("tqdm/__init__.py", f"VERSION = {version!r}\n")
            whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: tqdm\nVersion: {version}\n")
            whl.writestr(
                f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
            )
            whl.writestr(f"{info}/RECORD", "")
    site, names, ok = install_wheels(wheels, ["tqdm"], PY, log)
    assert ok and names == ["tqdm-4.70.1-py3-none-any.whl"]
    assert (site / "tqdm" / "__init__.py").read_text() == "VERSION = '4.70.1'\n"


# ---------------------------------------------------------------------------------------------- the summary


def fake_work(work: Path) -> None:
    """What the parts of a GPU run leave behind, made up."""
    (work / "digits").mkdir(parents=True)
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H100", "torch": "2.11", "cuda_available": True}))
    (work / "pytest.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_bf16" time="1.5"><properties>'
        '<property name="bf16_rel_error" value="0.004"/></properties></testcase>'
        '<testcase classname="tests.test_gpu" name="test_nccl" time="0.1"><failure message="no NCCL">x</failure>'
        "</testcase></testsuite></testsuites>"
    )
    rows = [{"step": 50, "train/loss": 1.25}, {"step": 100, "train/loss": "nan"}, {"step": 500, "train/loss": 0.5}]
    (work / "digits" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    (work / "train.log").write_text("warning: torch.compile failed; running eager\n")
    from sklearn.datasets import load_digits

    digits = load_digits()  # real digits as the "samples": the classifier must tell them apart
    np.savez(
        work / "digits_samples.npz", images=(digits.images[:10] * 255 / 16).astype(np.uint8), labels=digits.target[:10]
    )
    for name, objective, img_per_s, syncs in (("s2_compiled", "flow", 9000.0, 0), ("meanflow", "meanflow", 4000.0, 2)):
        result = {
            "model": {"name": "DiT-S/2"},
            "config": {"objective": objective},
            "train": [
                {
                    "compiled": True,
                    "precision": "bf16",
                    "batch_size": 256,
                    "img_per_s": img_per_s,
                    "mfu": 0.4,
                    "step_ms": 28.0,
                    "peak_memory_bytes": 2**31,
                    "host_syncs_per_step": syncs,
                }
            ],
            "sample": [{"nfe": 10, "cfg_scale": 4.0, "img_per_s": 5e4}] * (objective == "flow"),
        }
        (work / f"bench_{name}.json").write_text(json.dumps(result))


def test_the_summary_gathers_every_part_and_says_what_went_wrong(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    fake_work(work)
    out.mkdir()
    record = gpu_runner.part_record
    parts = [
        record("tests", "failed", 1, 20.04, 90),
        record("train", "ok", 0, 60, 120),
        record("resume", "ok", 0, 30, 60),
        record("sample", "ok", 0, 10, 45),
        record("bench_s2_compiled", "ok", 0, 80, 120),
        record("bench_b2_eager", "timeout", 124, 60, 60),
        record("bench_meanflow", "ok", 0, 70, 120),
    ]
    summary = summarize(work, parts, quick=False, budget_s=450, seconds=400, installed=["torchcfm-1.0.7.whl"])
    gpu_summary.write_summary(summary, out)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert list(summary) == [
        "mode",
        "seconds",
        "budget_s",
        "installed_wheels",
        "work",
        "env",
        "parts",
        "tests",
        "train",
        "bench",
        "meanflow",
        "vae_decode",
        "warnings",
        "ok",
    ]
    assert (summary["mode"], summary["ok"], summary["env"]["gpu"]) == ("gpu", False, "NVIDIA H100")
    assert summary["parts"][0] == record("tests", "failed", 1, 20.0, 90, "1 passed, 1 failed")

    tests = summary["tests"]
    assert (tests["passed"], tests["failed"], tests["error"], tests["skipped"]) == (1, 1, 0, 0)
    assert tests["cases"][0]["properties"] == {"bf16_rel_error": "0.004"} and tests["cases"][1]["message"] == "no NCCL"

    train = summary["train"]  # the string "nan" is no loss; the broken line is skipped
    assert (train["first_step"], train["first_loss"], train["final_step"], train["final_loss"]) == (50, 1.25, 500, 0.5)
    assert train["compile"] == "fell back to eager" and train["exit_codes"] == {"train": 0, "resume": 0, "sample": 0}
    assert train["samples"] == 10 and train["sample_accuracy"] >= 0.9

    bench = summary["bench"]
    assert list(bench["results"]) == ["s2_compiled", "meanflow"]  # in the order run
    assert [(r["run"], r["objective"], r["img_per_s"]) for r in bench["train"]] == [
        ("s2_compiled", "flow", 9000.0),
        ("meanflow", "meanflow", 4000.0),
    ]
    assert bench["train"][0]["peak_memory_gib"] == 2.0 and bench["sample"][0]["nfe"] == 10
    assert summary["meanflow"] == {"meanflow_img_per_s": 4000.0, "flow_img_per_s": 9000.0}
    assert summary["warnings"] == [
        "train: torch.compile fell back to eager",
        "bench_meanflow: 2 host synchronisations per training step",
    ]

    text = gpu_summary.report(summary, out)
    assert "failed: test_nccl: no NCCL" in text and "MeanFlow 4000.0 img/s against flow 9000.0 img/s" in text
    assert text.rstrip().endswith(f"FAILED: tests, bench_b2_eager; wrote {out}/summary.json and {out}/gpu_check.log")


def test_all_gpu_tests_skipped_marks_the_part_skipped(tmp_path):
    (tmp_path / "pytest.xml").write_text(
        '<testsuite><testcase name="test_a"><skipped message="needs a CUDA GPU"/></testcase></testsuite>'
    )
    summary = summarize(
        tmp_path, [gpu_runner.part_record("tests", "ok", 0, 3, 90)], quick=True, budget_s=450, seconds=5, installed=[]
    )
    assert summary["parts"][0]["status"] == "skipped" and summary["ok"] is True
    assert summary["parts"][0]["note"] == "all 1 GPU tests skipped: needs a CUDA GPU"
    assert summary["train"] == {} and summary["bench"] == {"results": {}, "train": [], "sample": []}
    assert "meanflow" not in summary and summary["env"] == {} and summary["mode"] == "quick-cpu"


# ---------------------------------------------------------------------------------------------- end to end


def test_run_of_the_tests_part_on_the_cpu_end_to_end(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()  # a wheel folder whose packages all import already: nothing may be installed
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "CUDA_VISIBLE_DEVICES": "",
        "GPU_CHECK_PARTS": "tests",
    }
    argv = ["run", "--out", str(out), "--work", str(tmp_path / "work"), "--wheels", str(wheels), "--python", PY]
    proc = subprocess.run(
        [PY, "-m", "benchmarks.gpu_check", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "summary.json"]
    log = (out / "gpu_check.log").read_text()
    assert log == proc.stdout  # everything printed is in the log, and nothing else
    assert "no CUDA device: quick CPU mode" in log and "every carried package imports already" in log
    assert log.rstrip().endswith(f"OK; wrote {out}/summary.json and {out}/gpu_check.log")

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["ok"], summary["installed_wheels"]) == ("quick-cpu", True, [])
    assert summary["env"]["cuda_available"] is False and summary["env"]["torch"]
    assert summary["env"]["missing_packages"] == []
    [tests] = summary["parts"]
    assert tests["name"] == "tests" and tests["status"] == "skipped" and "CUDA" in tests["note"], tests
    cases = summary["tests"]["cases"]
    assert len(cases) >= 6 and summary["tests"]["skipped"] == len(cases)
    assert all(c["outcome"] == "skipped" and "CUDA" in c["message"] for c in cases)
