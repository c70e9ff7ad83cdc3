"""A 2-process DistributedDataParallel run through torchrun with gloo on CPU, and its exact resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from stand_ins import CHILD_ENV, Features

from utils.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FLAGS = (
    "--dataset digits --image-size 8 --channels 1 --no-flip --model DiT-XS/2 --hidden-size 32 --depth 1 "
    "--num-heads 2 --num-registers 0 --steps 6 --batch-size 32 --lr 1e-3 --warmup 2 --ema-decay 0.9 "
    "--sample-every 3 --samples-per-class 1 --sample-steps 2 --cfg-scales 1 3 --ckpt-every 3 --log-every 3 "
    "--wandb disabled --num-workers 0 --device cpu --seed 5"
).split()


def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = CHILD_ENV
    return subprocess.run(
        [*TORCHRUN, str(ROOT / "train.py"), *FLAGS, "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_gloo_run_and_its_resume(tmp_path):
    full = torchrun(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    ckpts = tmp_path / "full/checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["0000003.pt", "0000006.pt", "last.pt"]
    state = load_checkpoint(ckpts / "last.pt")
    assert state["step"] == 6 and state["world_size"] == 2
    # Per-process seeds: each rank checkpointed its own, different generator state.
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # Rank 0 alone logs and samples: one line per log step, one grid per step and scale.
    assert len((tmp_path / "full/metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((tmp_path / "full/samples").glob("*.png"))) == 4

    # Resume a copy of the step-3 checkpoint: the same processes finish with the same weights.
    (tmp_path / "half/checkpoints").mkdir(parents=True)
    shutil.copy(ckpts / "0000003.pt", tmp_path / "half/checkpoints/last.pt")
    resumed = torchrun(tmp_path / "half", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_checkpoint(tmp_path / "half/checkpoints/last.pt")
    assert again["step"] == 6
    for part in ("model", "ema"):
        for k, v in state[part].items():
            assert torch.equal(v, again[part][k]), f"{part}.{k} differs after a DDP resume"


def test_a_plain_process_is_world_size_one(monkeypatch):
    from utils.distributed import all_gather_object, all_reduce_, init_distributed

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.is_main, info.distributed) == (0, 0, 1, True, False)
    assert info.device == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert all_gather_object({"a": 1}) == [{"a": 1}]


def test_device_choice(monkeypatch):
    from utils.distributed import resolve_device

    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    # Multi-node: the GPU index is LOCAL_RANK (this node's process index), never the global RANK.
    assert resolve_device("auto", local_rank=2) == torch.device("cuda", 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)


def test_more_processes_than_gpus_is_an_error(monkeypatch):
    from utils.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    for name in ("auto", "cuda"):  # not local_rank % 2 == 0: two processes on one GPU
        with pytest.raises(ValueError, match="LOCAL_RANK 2 has no GPU of its own.*2 CUDA device"):
            resolve_device(name, local_rank=2)


# train.py's command line with Features in place of Inception (which the test must not download).
FID_SCRIPT = """
import sys
import train
import evaluation.monitor
from stand_ins import Features

evaluation.monitor.load_inception = lambda device: Features()
sys.exit(train.cli(sys.argv[1:]))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_fid_on_two_processes_equals_the_single_process_value(tmp_path):
    """Each process samples half the FID images; the all-reduced statistics give the single-process FID."""
    from evaluation.fid import compute_fid, real_statistics
    from models import model_from_checkpoint
    from sampler import Sampler

    script = tmp_path / "train_fid.py"
    script.write_text(FID_SCRIPT)
    env = {**CHILD_ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    flags = [*FLAGS, "--steps", "2", "--sample-every", "0", "--ckpt-every", "0", "--log-every", "2"]
    flags += ["--fid-every", "2", "--fid-samples", "21", "--out", str(tmp_path / "run")]  # odd: unequal shares
    done = subprocess.run(
        [*TORCHRUN, str(script), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("FID") == 1  # printed by rank 0 only
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    logged = [r["eval/fid"] for r in rows if "eval/fid" in r]

    # The same FID in this single process: the run's EMA, the same extractor, sample i from noise i.
    extractor = Features()
    real = real_statistics("digits", "./datasets", 8, 1, extractor=extractor, cache_dir=tmp_path / "c2", progress=False)
    ema = model_from_checkpoint(tmp_path / "run/checkpoints/last.pt")
    fid, _ = compute_fid(Sampler(ema, steps=2, method="heun"), real, 21, extractor=extractor, seed=5, progress=False)
    assert len(logged) == 1 and logged[0] == pytest.approx(fid, rel=1e-9)  # float64 sums in another order


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_repa_run_on_two_processes_goes_past_the_end_of_the_alignment(tmp_path):
    """After --repa-until the projector stays in the graph with a zero weight: DDP finds a gradient for every
    parameter at every step (else its next step fails)."""
    from test_repa import export

    encoder = export(tmp_path)
    repa = ["--repa-weight", "0.5", "--repa-encoder", str(encoder), "--repa-until", "4", "--repa-projector-dim", "8"]
    run = torchrun(tmp_path / "repa", "--sample-every", "0", *repa)
    assert run.returncode == 0, run.stderr[-3000:]
    state = load_checkpoint(tmp_path / "repa/checkpoints/last.pt")
    assert state["step"] == 6 and state["model"]["projector.4.weight"].shape == (12, 8)
    logged = [json.loads(line) for line in (tmp_path / "repa/metrics.jsonl").read_text().splitlines()]
    assert all(-1 <= r["train/repa_loss"] <= 1 for r in logged) and len(logged) == 2
