"""utils/runfolder.py and --resume PATH: one run per folder (a lock that a second process meets, that a killed run
does not leave behind, held by rank 0 under DDP), a fresh run that never overwrites a run's files, stale temporary
files of killed writes cleaned at start-up, and a damaged last.pt that names the checkpoint to continue from."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from stand_ins import CHILD_ENV
from test_train import ROOT, assert_one_error_line, assert_same, cli_args, run_cli, tiny, weights

import train
from utils.checkpoint import load_checkpoint
from utils.runfolder import FolderLock, RunFolderError, run_files

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- the lock


def test_a_second_run_on_a_live_folder_refuses_and_a_killed_runs_lock_does_not_block_the_requeue(tmp_path):
    out = tmp_path / "run"
    args = cli_args(tiny(out, steps=10**6, ckpt_every=4, log_every=2))
    command = [sys.executable, "train.py", *args]
    first = subprocess.Popen(
        command, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seconds: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints/0000004.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        config = (out / "config.json").read_bytes()
        # A double submit and a requeue that overlaps the running job, at once.
        seconds += [
            subprocess.Popen(
                command + extra, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for extra in ([], ["--resume", "auto"])
        ]
        for second in seconds:
            _, err = second.communicate(timeout=60)  # a refusal takes seconds; a second run would train on
            assert_one_error_line(
                second.returncode, err, f"{out} is in use by host {socket.gethostname()} pid {first.pid}"
            )
            assert second.returncode == 2
        assert first.poll() is None, first.stderr.read()[-2000:]  # the first run goes on, its files its own
        assert (out / "config.json").read_bytes() == config and not list(out.glob("config-resume-*"))
    finally:
        for proc in seconds:  # only there when one was not refused
            proc.kill()
            proc.communicate()
        first.kill()  # SIGKILL: the OS drops its lock, .lock stays behind
        first.communicate()
    assert (out / ".lock").is_file()
    step = load_checkpoint(out / "checkpoints/last.pt")["step"]
    requeued = subprocess.run(
        command + ["--resume", "auto", "--steps", str(step + 2)],
        cwd=ROOT,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] == step + 2
    steps = metric_steps(out)
    assert len(steps) == len(set(steps)) and steps[-1] == step + 2  # one run's rows, each step once
    assert not (out / ".lock").exists()  # released at the end


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_rank_0_meets_the_lock_and_every_process_stops(tmp_path):
    out = tmp_path / "run"
    lock = FolderLock(out)  # this test process holds the folder, as a running job would
    try:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run(
            [*torchrun, "train.py", *cli_args(tiny(out, device="cpu"))],
            cwd=ROOT,
            env=CHILD_ENV,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        lock.release()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]  # rank 0 says it; rank 1 follows silently
    assert f"is in use by host {socket.gethostname()} pid {os.getpid()}" in errors[0]
    assert not out.exists()  # nothing written, and the folder this test made is gone with its lock


def test_the_lock_refuses_a_second_holder_and_a_released_lock_is_free(tmp_path):
    lock = FolderLock(tmp_path / "a/run")
    with pytest.raises(RunFolderError, match=f"in use by host .* pid {os.getpid()}"):
        FolderLock(tmp_path / "a/run")  # another open file: flock conflicts even within one process
    lock.release()
    assert not (tmp_path / "a").exists()  # the folders it created, empty, went with it
    FolderLock(tmp_path / "a/run").release()


# --------------------------------------------------------------------------------------- a run's files


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_even_without_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny(out, steps=4, log_every=1))
    shutil.rmtree(out / "checkpoints")  # deleted to save space: the logs are still the run's
    before = snapshot(out)
    for resume in ("no", "auto"):
        code, err = run_cli(cli_args(tiny(out, steps=8, resume=resume)), capsys)
        assert_one_error_line(
            code, err, "already holds a run (config.json, metrics.jsonl)", "no checkpoint to continue"
        )
    assert snapshot(out) == before and metric_steps(out) == [1, 2, 3, 4]
    # A folder with no run in it is fine: a Slurm log written there first, empty folders.
    other = tmp_path / "other"
    (other / "samples").mkdir(parents=True)
    (other / "checkpoints").mkdir()
    (other / "slurm-123.out").write_text("job log")
    assert train.main(tiny(other, steps=2))["step"] == 2 and (other / "slurm-123.out").read_text() == "job log"


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "config-resume-0000004.json",
        "metrics.jsonl",
        "samples/x.png",
        "checkpoints/0000004.pt",
        "wandb/run-1/files/a",
    ],
)
def test_each_kind_of_run_file_counts(tmp_path, name):
    assert run_files(tmp_path) == []
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("x")
    assert run_files(tmp_path) == [name if "/" not in name else name.split("/")[0] + "/"]


def test_stale_temporary_files_of_killed_writes_are_removed_at_start_up(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny(out, steps=4))
    ckpts = out / "checkpoints"
    stale = [
        ckpts / ".0000008.pt.k2j3h4g5.tmp",
        ckpts / ".last.pt.x9y8z7w6.tmp",
        ckpts / ".last.pt.4242.link",
        out / ".config-resume-0000004.json.a1b2c3d4.tmp",
        out / ".metrics.jsonl.q1w2e3r4.tmp",
    ]
    for path in stale:  # what SIGKILL leaves mid-write (tests/test_preemption.py kills runs for real)
        path.write_bytes(b"half a file" * 1000)
    keep = [out / "notes.tmp", ckpts / "mine.tmp"]  # not the run's temporary files
    for path in keep:
        path.write_text("the user's")
    capsys.readouterr()
    assert train.main(tiny(out, steps=6, resume="yes"))["step"] == 6
    assert not any(p.exists() for p in stale) and all(p.read_text() == "the user's" for p in keep)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("removed")]
    assert len(lines) == 1 and lines[0].startswith("removed 5 temporary file(s)") and ".last.pt.4242.link" in lines[0]


# ------------------------------------------------------------------------------------- --resume PATH


def test_a_truncated_last_pt_names_the_newest_readable_checkpoint_and_resume_path_continues_exactly(tmp_path, capsys):
    train.main(tiny(tmp_path / "full", steps=12))
    out = tmp_path / "run"
    train.main(tiny(out, steps=8, keep_checkpoints=0))
    ckpts = out / "checkpoints"
    data = (ckpts / "last.pt").read_bytes()
    with open(ckpts / "last.pt", "r+b") as f:  # cut short in place: 0000008.pt, the same file, with it
        f.truncate(len(data) // 2)
    before = snapshot(out)
    for resume in ("auto", "yes"):
        code, err = run_cli(cli_args(tiny(out, steps=12, resume=resume)), capsys)
        assert_one_error_line(
            code,
            err,
            f"cannot read checkpoint {ckpts / 'last.pt'}: the file is truncated",
            f"newest readable checkpoint is {ckpts / '0000004.pt'} (step 4)",
            f"--resume {ckpts / '0000004.pt'}",
        )
        assert code == 2
    assert snapshot(out) == before  # no silent switch: nothing written
    code, err = run_cli(cli_args(tiny(out, steps=12, resume=str(ckpts / "0000004.pt"))), capsys)
    assert code == 0, err
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(ckpts / "last.pt"))
    assert metric_steps(out) == metric_steps(tmp_path / "full")


def test_resume_path_from_another_folder_starts_a_new_run_folder(tmp_path, capsys):
    train.main(tiny(tmp_path / "full", steps=8))
    train.main(tiny(tmp_path / "a", steps=4))
    source = tmp_path / "a/checkpoints/0000004.pt"
    code, err = run_cli(cli_args(tiny(tmp_path / "full", steps=8, resume=str(source))), capsys)
    assert_one_error_line(
        code, err, "already holds a run", f"--resume {source} continues into a folder that holds no run"
    )
    code, err = run_cli(cli_args(tiny(tmp_path / "nowhere", resume=str(tmp_path / "none.pt"))), capsys)
    assert_one_error_line(code, err, f"--resume {tmp_path / 'none.pt'}: no such checkpoint file")
    fork = train.main(tiny(tmp_path / "fork", steps=8, resume=str(source)))
    assert fork["step"] == 8
    assert_same(weights(tmp_path / "full/checkpoints/last.pt"), weights(tmp_path / "fork/checkpoints/last.pt"))
    assert json.loads((tmp_path / "fork/config.json").read_text())["resume"] == str(source)  # its own first config
    assert metric_steps(tmp_path / "fork") == [6, 8]
