"""Runs that are killed, preempted, time-limited or extended continue exactly: SIGKILL, SIGTERM, SIGINT, SIGUSR1
under one and two processes, --resume auto, --time-limit, and diagnostics (samples, GIFs, FID, failures) that
never touch the training randomness."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from stand_ins import CHILD_ENV, Features
from test_train import ROOT, assert_same, cli_args, run_cli, tiny, weights

import evaluation.monitor
import train
from evaluation.fid import FIDError
from utils.checkpoint import load_checkpoint
from utils.preemption import EXIT_CODES, TIME_LIMIT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ENV = CHILD_ENV


def interrupt(command: list[str], sig: int, once: Path, timeout: float = 240, **popen) -> subprocess.CompletedProcess:
    """Run command, send sig to it once the file ``once`` exists (from outside, as a scheduler would), wait."""
    proc = subprocess.Popen(
        command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    deadline = time.monotonic() + timeout
    while not once.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def long_run(out: Path, **overrides) -> train.TrainConfig:
    """A run long enough that a signal sent at its second checkpoint arrives well before its end."""
    return tiny(out, **{"steps": 60, "ckpt_every": 4, "keep_checkpoints": 0, **overrides})


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    train.main(long_run(tmp_path / "full"))
    args = cli_args(long_run(tmp_path / "killed"))
    ckpts = tmp_path / "killed/checkpoints"
    # Killed at any moment after step 12's file appears: last.pt may or may not point at it yet.
    killed = interrupt([sys.executable, "train.py", *args], signal.SIGKILL, once=ckpts / "0000012.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert 8 <= load_checkpoint(ckpts / "last.pt")["step"] < 60
    # A kill during a write leaves a temporary file behind: it must not disturb the resume.
    (ckpts / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    resumed = subprocess.run(
        [sys.executable, "train.py", *args, "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(ckpts / "last.pt"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_checkpoints_the_step_in_progress_and_the_resume_is_exact(tmp_path, sig):
    train.main(long_run(tmp_path / "full"))
    args = cli_args(long_run(tmp_path / "run"))
    ckpts = tmp_path / "run/checkpoints"
    stopped = interrupt([sys.executable, "train.py", *args], sig, once=ckpts / "0000008.pt")
    assert stopped.returncode == EXIT_CODES[sig] == 128 + sig, stopped.stderr[-2000:]
    step = load_checkpoint(ckpts / "last.pt")["step"]
    assert 8 <= step < 60 and (ckpts / f"{step:07d}.pt").is_file()  # the step in progress, beside the regular ones
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("train.py: stopped")]
    assert len(lines) == 1 and f"after step {step}" in lines[0] and str(ckpts / "last.pt") in lines[0]
    resumed = subprocess.run(
        [sys.executable, "train.py", *args, "--resume", "auto"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(ckpts / "last.pt"))


def test_a_second_ctrl_c_while_stopping_changes_nothing(tmp_path):
    ckpts = tmp_path / "run/checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *cli_args(long_run(tmp_path / "run"))],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (ckpts / "0000004.pt").exists() and proc.poll() is None:
        time.sleep(0.005)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-2000:]
    assert err.count("train.py: stopped by SIGINT") == 1
    state = load_checkpoint(ckpts / "last.pt")
    assert state["step"] >= 4 and not list(ckpts.glob(".*.tmp"))


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    train.main(tiny(tmp_path / "full", steps=8, ckpt_every=0))
    first = train.main(tiny(tmp_path / "run", steps=4, ckpt_every=0, resume="auto"))  # nothing to resume: fresh
    assert first["step"] == 4 and not (tmp_path / "run/config-resume-0000004.json").exists()
    second = train.main(tiny(tmp_path / "run", steps=8, ckpt_every=0, resume="auto"))
    assert second["step"] == 8 and (tmp_path / "run/config-resume-0000004.json").is_file()
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "run/checkpoints/last.pt"))


def test_time_limit_checkpoints_and_stops_before_the_budget(tmp_path, capsys):
    budget = 0.1  # minutes, counted from the start of main()
    start = time.monotonic()
    result = train.main(tiny(tmp_path / "run", steps=10**6, ckpt_every=0, log_every=50, time_limit=budget))
    elapsed = time.monotonic() - start
    assert result["stopped_by"] == TIME_LIMIT and 0 < result["step"] < 10**6
    assert elapsed < 60 * budget + 1  # stopped (with its checkpoint written) before the budget ran out
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == result["step"]
    code, err = run_cli(cli_args(tiny(tmp_path / "cli", steps=10**6, ckpt_every=0, time_limit=0.02)), capsys)
    assert code == EXIT_CODES[TIME_LIMIT] == 124 and "stopped by --time-limit" in err


def fid_that_draws_then_fails(device):
    """An Inception set-up that draws from every generator and then fails (offline): a diagnostic that raises."""
    torch.randn(100)
    import random

    import numpy as np

    np.random.rand(10), random.random()
    raise FIDError("cannot download the Inception weights")


def test_extension_with_samples_gifs_and_fid_at_the_last_step_is_bit_identical(tmp_path, monkeypatch):
    """The reproduction of a finished run extended with a larger --steps: diagnostics at its last step (samples,
    GIFs, FID, and an FID set-up that fails) must leave the training randomness as it was."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    on = dict(sample_every=6, fid_every=6, fid_samples=10)
    train.main(tiny(tmp_path / "full", steps=12, **on), fid_extractor=Features())
    train.main(tiny(tmp_path / "ext", steps=6, **on), fid_extractor=Features())
    assert len(list((tmp_path / "ext/samples").glob("step0000006_*.gif"))) == 2  # the diagnostics did run
    train.main(tiny(tmp_path / "ext", steps=12, resume="yes", **on), fid_extractor=Features())
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "ext/checkpoints/last.pt"))
    full, ext = (
        load_checkpoint(tmp_path / "full/checkpoints/last.pt"),
        load_checkpoint(tmp_path / "ext/checkpoints/last.pt"),
    )
    assert full["data_state"] == ext["data_state"] and torch.equal(full["rng"][0]["torch"], ext["rng"][0]["torch"])

    # The reproduction: FID at its default (set up at the last step, failing offline) and samples off.
    monkeypatch.setattr(evaluation.monitor, "load_inception", fid_that_draws_then_fails)
    default_fid = dict(sample_every=0, fid_every=20_000)
    train.main(tiny(tmp_path / "a", steps=8, **default_fid))
    train.main(tiny(tmp_path / "b", steps=4, **default_fid))
    train.main(tiny(tmp_path / "b", steps=8, resume="yes", **default_fid))
    assert_same(weights(tmp_path / "a/checkpoints/last.pt"), weights(tmp_path / "b/checkpoints/last.pt"))


def test_diagnostics_on_failing_or_off_end_bit_identical(tmp_path, monkeypatch):
    def broken_samples(self, *args):  # whatever Monitor.samples is given
        torch.rand(1000)  # draws, then fails half-way
        raise RuntimeError("disk full")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    off = train.main(tiny(tmp_path / "off", steps=8))
    working = train.main(
        tiny(tmp_path / "working", steps=8, sample_every=2, fid_every=4, fid_samples=10), fid_extractor=Features()
    )
    assert len(list((tmp_path / "working/samples").glob("*.png"))) == 8  # they ran: steps 2, 4, 6, 8 at 2 scales
    assert_same(weights(tmp_path / "off/checkpoints/last.pt"), weights(tmp_path / "working/checkpoints/last.pt"))
    monkeypatch.setattr(evaluation.monitor.Monitor, "samples", broken_samples)
    monkeypatch.setattr(evaluation.monitor, "load_inception", fid_that_draws_then_fails)
    on = train.main(tiny(tmp_path / "on", steps=8, sample_every=2, fid_every=4))
    assert on["step"] == off["step"] == working["step"] == 8
    assert_same(weights(tmp_path / "off/checkpoints/last.pt"), weights(tmp_path / "on/checkpoints/last.pt"))


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def worker_pid(parent: int, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun worker of this rank (a child of the agent with RANK in its environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise TimeoutError(f"no worker of rank {rank}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_sigterm_to_one_ddp_process_stops_both_at_the_same_step(tmp_path):
    args = cli_args(long_run(tmp_path / "run", steps=400, device="cpu"))
    ckpts = tmp_path / "run/checkpoints"
    proc = subprocess.Popen(
        [*TORCHRUN, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rank1 = worker_pid(proc.pid, 1)
    while not (ckpts / "0000008.pt").exists() and proc.poll() is None:
        time.sleep(0.005)
    os.kill(rank1, signal.SIGTERM)  # only rank 1 hears it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("train.py: stopped by SIGTERM") == 1, err[-3000:]  # rank 0 says it
    state = load_checkpoint(ckpts / "last.pt")
    step = state["step"]
    assert 8 <= step < 400 and len(state["rng"]) == 2  # both processes took part in the checkpoint of that step
    numbered = sorted(int(p.stem) for p in ckpts.glob("0*.pt"))
    assert numbered == list(range(4, step, 4)) + [step]  # one checkpoint written at the stop, none after it


def test_meanflow_resume_is_bit_identical(tmp_path):
    mf = dict(objective="meanflow", ckpt_every=0)
    train.main(tiny(tmp_path / "full", steps=8, **mf))
    train.main(tiny(tmp_path / "part", steps=4, **mf))
    train.main(tiny(tmp_path / "part", steps=8, resume="yes", **mf))
    assert load_checkpoint(tmp_path / "part/checkpoints/last.pt")["config"]["objective"] == "meanflow"
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "part/checkpoints/last.pt"))


# train.py's command line with Features in place of Inception; it touches $MARK when the diagnostics start sampling.
# With $DOPRI5 set the diagnostics sample with dopri5 at tight tolerances (a single grid chunk then takes a minute).
MARKED_SCRIPT = """
import json
import os
import sys
from pathlib import Path

import evaluation.monitor
import sampling.sampler
import train
from stand_ins import Features

generate = sampling.sampler.Sampler.generate


def marked(self, *args, **kwargs):
    Path(os.environ["MARK"]).touch()
    return generate(self, *args, **kwargs)


sampling.sampler.Sampler.generate = marked
evaluation.monitor.load_inception = lambda device: Features()
if os.environ.get("DOPRI5"):
    evaluation.monitor.Monitor.sampler = lambda self, model: sampling.sampler.Sampler(
        model, self.decoder, method="dopri5", rtol=1e-10, atol=1e-10
    )
sys.exit(train.cli(sys.argv[1:]))
"""


def marked_run(
    tmp_path: Path, args: list[str], sig: int, launcher: list[str] | None = None, wait: float = 30, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    """Run train.py's CLI (through MARKED_SCRIPT), send sig once the diagnostics sample; the process and the seconds
    from the signal to its exit (the test fails when it outlives ``wait``)."""
    script = tmp_path / "train_marked.py"
    script.write_text(MARKED_SCRIPT)
    mark = tmp_path / "sampling"
    env = {**ENV, "MARK": str(mark), "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    command = [*(launcher or [sys.executable]), str(script), *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    time.sleep(0.2)  # well inside the diagnostic
    sent = time.monotonic()
    os.kill(proc.pid if launcher is None else worker_pid(proc.pid, 1), sig)
    try:
        out, err = proc.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"still running {wait} s after the signal")
    return subprocess.CompletedProcess(command, proc.returncode, out, err), time.monotonic() - sent


@pytest.mark.parametrize(
    "what, sig",
    [
        ("fid", signal.SIGTERM),
        ("grid", signal.SIGINT),
        ("fid-one-chunk", signal.SIGTERM),
        ("grid-one-chunk", signal.SIGTERM),
        ("dopri5-grid-one-chunk", signal.SIGTERM),
    ],
)
def test_a_signal_during_fid_or_a_sample_grid_abandons_it_and_checkpoints_within_seconds(tmp_path, what, sig):
    """The issue's measurement: a stop request during an FID of a million samples (minutes) or a sample grid of a
    slow solver (tens of seconds) is noticed before the next solver step, also inside one chunk of samples (200
    samples at 2000 heun steps, or at dopri5's tolerance 1e-10: a minute or more each); the diagnostic logs
    nothing, the next step is checkpointed and the run exits with the signal's code, and the resume loses nothing."""
    diagnostics = {
        "fid": dict(fid_every=6, fid_samples=10**6),
        "grid": dict(sample_every=6, samples_per_class=100, sample_steps=100),
        "fid-one-chunk": dict(fid_every=6, fid_samples=200, sample_steps=2000),
        "grid-one-chunk": dict(sample_every=6, samples_per_class=20, sample_steps=2000),
        "dopri5-grid-one-chunk": dict(sample_every=6, samples_per_class=20),
    }[what]
    cfg = long_run(tmp_path / "run", **diagnostics)
    stopped, seconds = marked_run(tmp_path, cli_args(cfg), sig, **({"DOPRI5": "1"} if "dopri5" in what else {}))
    assert stopped.returncode == EXIT_CODES[sig], stopped.stderr[-2000:]
    # About 1-1.5 s alone on 2 cores; the bound leaves room for a loaded machine, far below a chunk's minute.
    assert seconds < 12, f"{seconds:.1f} s from the signal to the exit"
    ckpts = tmp_path / "run/checkpoints"
    assert load_checkpoint(ckpts / "last.pt")["step"] == 7  # the step after the abandoned diagnostic
    assert f"at step 6 abandoned ({train.REASONS[sig]})" in stopped.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert not any("eval/fid" in r for r in rows) and not (tmp_path / "run/samples").exists()  # nothing partial
    train.main(long_run(tmp_path / "full"))
    resumed = subprocess.run(
        [sys.executable, "train.py", *cli_args(cfg), "--resume", "auto", "--fid-every", "0", "--sample-every", "0"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(ckpts / "last.pt"))


def test_time_limit_abandons_a_diagnostic_that_would_outlast_the_budget(tmp_path, monkeypatch):
    """An FID of a million samples (over a minute) starts a second into a 6-second budget: it is abandoned in
    time for the checkpoint, and logs nothing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    budget = 0.1  # minutes, counted from the start of main()
    start = time.monotonic()
    cfg = tiny(
        tmp_path / "run", steps=10**6, ckpt_every=0, log_every=50, time_limit=budget, fid_every=20, fid_samples=10**6
    )
    result = train.main(cfg, fid_extractor=Features())
    elapsed = time.monotonic() - start
    assert result["stopped_by"] == TIME_LIMIT and elapsed < 60 * budget + 1, f"{elapsed:.1f} s"
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == result["step"] > 20
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert not any("eval/fid" in r for r in rows)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("sample_steps", [2, 2000])
def test_sigterm_to_one_ddp_process_during_fid_abandons_it_on_both_at_the_same_batch(tmp_path, sample_steps):
    """FID runs on every process and only rank 1 hears the signal: the agreed stop flag, asked before each solver
    step by both (at 2000 steps one batch takes minutes), has them leave the FID together (no collective left
    waiting) and checkpoint the next step."""
    cfg = long_run(tmp_path / "run", steps=400, device="cpu", fid_every=6, fid_samples=10**6, sample_steps=sample_steps)
    stopped, seconds = marked_run(tmp_path, cli_args(cfg), signal.SIGTERM, launcher=TORCHRUN, wait=60)
    assert stopped.returncode != 0 and stopped.stderr.count("train.py: stopped by SIGTERM") == 1, stopped.stderr[-3000:]
    assert seconds < 15, f"{seconds:.1f} s from the signal to the exit"
    assert stopped.stderr.count("FID at step 6 abandoned (SIGTERM)") == 1  # said by rank 0
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["step"] == 7 and len(state["rng"]) == 2


AGREED_SCRIPT = """
import signal
import sys
from pathlib import Path

import torch.distributed as dist

from utils.preemption import AgreedStop, StopRequest

dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopRequest()
agreed = AgreedStop(stop)
log = [agreed.step() for _ in range(5 if rank == 0 else 2)]  # batch 1: unequal asks (dopri5, an idle batch)
log.append(agreed.meet())  # rank 1 waits here while rank 0 still asks
for i in range(1000):  # batch 2: rank 1 hears a signal before its third step
    if rank == 1 and i == 2:
        stop.signum = signal.SIGTERM
    if agreed.step():
        break
log += [i, agreed.meet(), agreed.reason, stop.check()]  # asking after a stop costs nothing; the group is in step
Path(sys.argv[1], f"rank{rank}.txt").write_text(str(log))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_agreed_stop_keeps_processes_that_ask_unequally_often_in_step(tmp_path):
    script = tmp_path / "agreed.py"
    script.write_text(AGREED_SCRIPT)
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*TORCHRUN, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sigterm = int(signal.SIGTERM)
    assert (
        tmp_path / "rank0.txt"
    ).read_text() == f"[False, False, False, False, False, False, 2, True, {sigterm}, {sigterm}]"
    assert (tmp_path / "rank1.txt").read_text() == f"[False, False, False, 2, True, {sigterm}, {sigterm}]"
