"""What a cluster run does when something goes wrong: docs/reliability.md's Slurm script requeues only the stops that
continue, a damaged image met mid-run leaves a checkpoint of the last finished step, a full disk and a signal
during set-up end with one line and the documented exit code, and nothing already written is lost."""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import CHILD_ENV
from test_train import ROOT, assert_one_error_line, assert_same, cli_args, run_cli, tiny, weights

import train
import utils.io
from data import BatchStream, TensorImageDataset
from utils.checkpoint import load_checkpoint
from utils.preemption import EXIT_CODES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------------------- the Slurm script


def slurm_script() -> str:
    """docs/reliability.md's Slurm job script (the bash block that starts with #!/bin/bash and holds #SBATCH)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "reliability.md").read_text(), re.S)
    scripts = [b for b in blocks if b.startswith("#!/bin/bash") and "#SBATCH" in b]
    assert len(scripts) == 1, "docs/reliability.md holds one Slurm script"
    return scripts[0]


@pytest.mark.parametrize("code", [0, 1, 2, 124, 130, 138, 143, 137])
def test_the_documented_slurm_script_requeues_only_runs_that_stopped_to_continue(tmp_path, code):
    """srun and scontrol are fakes on PATH: srun exits with train.py's code, scontrol records what it is asked."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nexit {code}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {calls}\n[ "$1" = show ] && echo node1\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "job.sh").write_text(slurm_script())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node1",
    }
    job = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    requeued = calls.exists() and "requeue 4242" in calls.read_text()
    continues = code in set(EXIT_CODES.values())  # 124 time limit, 130/143/138 SIGINT/SIGTERM/SIGUSR1
    assert continues == (code in (124, 130, 138, 143))
    assert requeued == continues, (code, job.stdout, job.stderr)
    assert job.returncode == code, job.stderr  # the job's own state says how the run ended


# ------------------------------------------------------------------------------------------------- a full disk


def messages(stderr: str) -> list[str]:
    """The lines of stderr besides the progress bar's."""
    return [line for line in stderr.splitlines() if line.strip() and not line.strip().startswith("train:")]


# Run train.py with a disk that fills up while the checkpoint of step 8 is written: every file that utils.io opens
# for it fails its writes with ENOSPC after 4 KiB, as a real full disk does (torch.save then raises its own
# "unexpected pos" RuntimeError); everything else is written as usual.
FULL_DISK = """
import errno, os, sys
import train

real_fdopen = os.fdopen

class FullDisk:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        self.written += len(data)
        if self.written > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self.f, name)

def fdopen(fd, *args, **kwargs):
    f = real_fdopen(fd, *args, **kwargs)
    return FullDisk(f) if ".0000008.pt." in os.readlink(f"/proc/self/fd/{fd}") else f

os.fdopen = fdopen
sys.exit(train.cli(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being written through /proc")
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file_and_keeps_last_pt(tmp_path):
    args = cli_args(tiny(tmp_path / "run", steps=12, ckpt_every=4))
    ckpts = tmp_path / "run/checkpoints"
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=240
    )
    lines = messages(full.stderr)
    assert full.returncode == 1 and len(lines) == 1, full.stderr[-3000:]
    assert lines[0].startswith("train.py: error:") and "no space left" in lines[0].lower(), lines[0]
    assert str(ckpts / "0000008.pt") in lines[0], lines[0]
    assert load_checkpoint(ckpts / "last.pt")["step"] == 4  # the last checkpoint written stays what it was
    assert sorted(p.name for p in ckpts.iterdir()) == ["0000004.pt", "last.pt"]  # no half-written file left


def test_a_full_disk_at_start_up_names_the_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(utils.io.os, "fsync", full)
    code, err = run_cli(cli_args(tiny(tmp_path / "run")), capsys)
    assert code == 1
    assert_one_error_line(code, err, "No space left on device", str(tmp_path / "run" / "config.json"))
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------- a damaged image mid-run


def image_folder(root: Path, per_class: int) -> Path:
    """Two classes of random 8x8 gray PNGs."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def met_at_step(n: int, batch_size: int, step: int, seed: int = 0) -> int:
    """The index of an image that the data stream first fetches for the given step (1-based) of a fresh run."""
    stream = BatchStream(
        TensorImageDataset(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.arange(n), ["x"]),
        batch_size,
        seed=seed,
        flip=False,
    )
    for _ in range(step):
        _, y = next(stream)
    return int(y[0])


def test_a_damaged_image_mid_run_checkpoints_the_last_step_and_names_the_file(tmp_path, capsys):
    data = image_folder(tmp_path / "data", per_class=160)  # 320 images: 10 steps of 32 per epoch
    shutil.copytree(data, tmp_path / "intact")
    cfg = tiny(tmp_path / "run", dataset="folder", data_path=str(data), data_on_device=None, steps=12, ckpt_every=4)
    ckpts = tmp_path / "run/checkpoints"
    samples = sorted((data / c / f).as_posix() for c in ("a", "b") for f in os.listdir(data / c))
    bad = Path(samples[met_at_step(320, cfg.batch_size, step=6)])  # first read for step 6
    bad.write_bytes(bad.read_bytes()[:48])  # the header reads, the pixels do not (as a file damaged on disk)
    code, err = run_cli(cli_args(cfg), capsys)
    assert code == 2  # bad input: the documented Slurm script does not requeue it
    assert_one_error_line(code, "\n".join(messages(err)), str(bad), "step 5", str(ckpts / "last.pt"))
    assert load_checkpoint(ckpts / "last.pt")["step"] == 5  # the last finished step, beside the regular one
    # Exact up to there: the same as a run of 5 steps on the undamaged data.
    train.main(
        tiny(
            tmp_path / "ref",
            dataset="folder",
            data_path=str(tmp_path / "intact"),
            data_on_device=None,
            steps=5,
            ckpt_every=4,
        )
    )
    assert_same(weights(tmp_path / "ref/checkpoints/last.pt"), weights(ckpts / "last.pt"))
    # Without the file the run continues, on a new epoch over the images that are left, and says so.
    bad.unlink()
    capsys.readouterr()
    assert train.cli([*cli_args(cfg), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "320 images before, 319 now" in out and "new epoch" in out, out
    state = load_checkpoint(ckpts / "last.pt")
    assert state["step"] == 12 and state["data_state"]["epoch"] == 1


# ------------------------------------------------------------------------------------- a signal during set-up

# train.py whose set-up stops in the data set's build, after touching a marker file: a signal sent then arrives
# during set-up, before there is anything to checkpoint.
SLOW_SETUP = """
import sys, time
from pathlib import Path
import train

real_build = train.build_dataset

def build_dataset(*args, **kwargs):
    Path(sys.argv[1]).touch()
    time.sleep(60)
    return real_build(*args, **kwargs)

train.build_dataset = build_dataset
sys.exit(train.cli(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_set_up_is_one_line_and_its_exit_code(tmp_path, sig):
    marker = tmp_path / "in-set-up"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SETUP, str(marker), *cli_args(tiny(tmp_path / "run"))],
        cwd=ROOT,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODES[sig], err[-3000:]  # 130 / 143, as after a signal mid-run
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith(f"train.py: stopped by {signal.Signals(sig).name} during set-up")
    assert not (tmp_path / "run/checkpoints").exists()
