"""Damaged, interrupted and concurrent latent extractions: shard digests taken once and checked before training,
reruns that never keep a damaged shard, the run lock, signals, and a VAE that moved.

Uses the tiny VAE and image folder of tests/test_latents.py; nothing is downloaded.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from stand_ins import CHILD_ENV
from test_latents import ROOT, extract, files, latent_run, make_images, make_vae
from test_train import cli_args

import train
from data.latents import LatentDataset
from models.vae import VAEError, load_autoencoder
from utils.preemption import EXIT_CODES

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SHARD = "shard-00001.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny VAE, 10 images in 2 classes and their latents (shards of 4, 4, 2 images)."""
    root = tmp_path_factory.mktemp("latents")
    make_vae(root / "vae")
    make_images(root / "images")
    assert extract(root / "images", root / "latents", root / "vae") == 0
    return root


def copy(world: Path, tmp_path: Path) -> Path:
    """A copy of the latents with the files' times (shutil.copy2), as rsync -a makes one."""
    return Path(shutil.copytree(world / "latents", tmp_path / "latents"))


def overwrite(path: Path, start: int, stop: int) -> None:
    """Bytes start..stop of a file set to 0xFF (float16 NaN), in place, as the damage a disk or a copy may do."""
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * (stop - start))


def one_line(err: str, script: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: "), err
    return lines[0]


def test_each_shard_is_hashed_once_when_written_and_verify_hashes_again(world, tmp_path, monkeypatch, capsys):
    index = json.loads((world / "latents/index.json").read_text())
    for shard in index["shards"]:
        data = (world / "latents" / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
        record = (world / "latents" / f"{shard['file']}.sha256").read_text()
        assert record == f"{shard['sha256']}  {shard['file']}\n"  # sha256sum -c reads it
    out = copy(world, tmp_path)
    read = []
    monkeypatch.setattr(Path, "read_bytes", lambda p: read.append(p.name) or open(p, "rb").read())
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: read.append(Path(f.name).name) or digest(f, name))
    # a rerun that only changes the index reads no shard
    assert extract(world / "images", out, world / "vae", "--normalization", "stats") == 0
    assert not [name for name in read if name.endswith(".safetensors")]
    # damage that keeps the file's time is found by --verify only, which encodes the shard again
    assert extract(world / "images", out, world / "vae") == 0
    shard = out / SHARD
    times = shard.stat()
    overwrite(shard, 1000, 3000)
    os.utime(shard, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert extract(world / "images", out, world / "vae") == 0
    assert not [name for name in read if name.endswith(".safetensors")]
    capsys.readouterr()
    assert extract(world / "images", out, world / "vae", "--verify") == 0
    assert sorted(read) == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert f"encoding 1 shard(s) again ({SHARD}: its sha256 is not the one recorded" in capsys.readouterr().out
    assert files(out) == files(world / "latents")


@pytest.mark.parametrize("on_device", [True, False])
def test_training_on_a_damaged_shard_is_one_error_naming_it(world, tmp_path, capsys, on_device):
    data = copy(world, tmp_path)
    overwrite(data / SHARD, 1000, 3000)
    cfg = latent_run(world, tmp_path / "run", data_path=str(data), data_on_device=on_device)
    capsys.readouterr()
    assert train.cli(cli_args(cfg)) == 2
    line = one_line(capsys.readouterr().err, "train.py")
    assert f"latents shard {data / SHARD} is damaged: its sha256 is not the one recorded" in line
    assert "extract_latents.py" in line and not (tmp_path / "run").exists()
    # a shard cut short: its size is not the index's
    shutil.copy2(world / "latents" / SHARD, data / SHARD)
    os.truncate(data / SHARD, 3000)
    assert train.cli(cli_args(cfg)) == 2
    line = one_line(capsys.readouterr().err, "train.py")
    assert f"{data / SHARD} is damaged: it has 3000 bytes, index.json lists" in line


def test_a_shard_is_hashed_once_then_trusted_while_unchanged(world, tmp_path, capsys):
    data = copy(world, tmp_path)
    capsys.readouterr()
    LatentDataset(data)  # the records written with the shards are newer than them: nothing to hash
    assert "hashed" not in capsys.readouterr().out
    for record in data.glob("*.sha256"):  # an extraction before records existed: the index's sha256 is checked
        record.unlink()
    LatentDataset(data)
    assert "latents: hashed 3 shard(s)" in capsys.readouterr().out
    assert files(data) == files(world / "latents")  # the records are written again
    LatentDataset(data)
    assert "hashed" not in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_rerun_encodes_a_damaged_shard_again(world, tmp_path, capsys, damage):
    out = copy(world, tmp_path)
    if damage == "truncate":
        os.truncate(out / SHARD, 3000)
    else:
        overwrite(out / SHARD, 1000, 3000)
    (out / "index.json").unlink()
    capsys.readouterr()
    assert extract(world / "images", out, world / "vae") == 0
    said = capsys.readouterr().out
    assert f"encoding 1 shard(s) again ({SHARD}: " in said and "2 of 3 shards already in" in said
    assert files(out) == files(world / "latents")  # the shard as it was, and an index of it


def test_out_inside_the_images_is_refused_before_anything_is_written(world, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    capsys.readouterr()
    assert extract(images, images / "latents", world / "vae") == 2
    assert "is inside --data-path" in one_line(capsys.readouterr().err, "extract_latents.py")
    assert sorted(p.name for p in images.iterdir()) == ["cat", "dog"]


# An extraction that takes seconds: each image read waits 0.2 s.
SLOW = (
    "import sys, time, data.folder as f; get = f.ImageFolderDataset.__getitem__; "
    "f.ImageFolderDataset.__getitem__ = lambda self, i: (time.sleep(0.2), get(self, i))[1]; "
    "import extract_latents; sys.exit(extract_latents.cli(sys.argv[1:]))"
)


def slow_extraction(world: Path, out: Path, workers: int = 0) -> subprocess.Popen:
    args = ["--data-path", str(world / "images"), "--out", str(out), "--vae", str(world / "vae"), "--image-size"]
    args += ["16", "--shard-size", "4", "--batch-size", "3", "--num-workers", str(workers), "--no-progress"]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW, *args], cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(path: Path, proc: subprocess.Popen, text: str = "") -> None:
    deadline = time.monotonic() + 120
    while not (path.is_file() and text in path.read_text()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_extraction_with_one_line_and_a_second_one_is_refused_meanwhile(world, tmp_path, capsys, sig):
    out = tmp_path / "latents"
    proc = slow_extraction(world, out, workers=int(sig == signal.SIGTERM))  # SIGTERM: with a loader worker
    wait_for(out / ".lock", proc, f"pid {proc.pid}")
    capsys.readouterr()
    assert extract(world / "images", out, world / "vae") == 2
    line = one_line(capsys.readouterr().err, "extract_latents.py")
    assert f"is in use by host {os.uname().nodename} pid {proc.pid}" in line
    wait_for(out / "shard-00000.safetensors.sha256", proc)  # stopped in the middle of the extraction
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODES[sig] == 128 + sig, err.decode()[-2000:]
    line = one_line(err.decode(), "extract_latents.py")
    assert f"stopped by {signal.Signals(sig).name}" in line and "run the same command again" in line
    assert not (out / ".lock").exists() and not (out / "index.json").exists()
    assert extract(world / "images", out, world / "vae") == 0
    assert files(out) == files(world / "latents")


def test_a_vae_folder_that_moved_is_named_without_hub_advice(tmp_path):
    for name in (str(tmp_path / "moved/vae"), "runs/old/vae"):
        with pytest.raises(VAEError) as e:
            load_autoencoder(name)
        text = str(e.value)
        assert text.startswith(f"the VAE folder {Path(name)} is not there") and "--vae" in text
        assert "huggingface-cli" not in text and "http" not in text


def test_train_takes_the_vae_again_after_it_moved_and_reports_a_change_on_resume(world, tmp_path, capsys):
    data = copy(world, tmp_path)
    index = json.loads((data / "index.json").read_text())
    index["latent_space"]["vae"] = str(tmp_path / "old/vae")  # where the VAE was when the latents were made
    (data / "index.json").write_text(json.dumps(index))
    moved, again = shutil.copytree(world / "vae", tmp_path / "vae"), shutil.copytree(world / "vae", tmp_path / "vae2")
    run = tmp_path / "run"
    cfg = latent_run(world, run, data_path=str(data), steps=3, sample_every=3)
    capsys.readouterr()
    assert train.cli(cli_args(cfg)) == 2
    line = one_line(capsys.readouterr().err, "train.py")
    assert f"the VAE folder {tmp_path / 'old/vae'} is not there" in line and "--vae" in line
    assert "huggingface-cli" not in line and not run.exists()
    assert train.cli([*cli_args(cfg), "--vae", str(tmp_path / "nowhere/vae"), "--sample-every", "0"]) == 2
    assert "nowhere/vae is not there" in one_line(capsys.readouterr().err, "train.py") and not run.exists()
    assert train.cli([*cli_args(cfg), "--vae", str(moved)]) == 0
    assert (run / "samples/step0000003_cfg1.png").is_file()
    assert json.loads((run / "config.json").read_text())["vae"] == str(moved)
    capsys.readouterr()
    assert train.cli([*cli_args(cfg), "--vae", str(again), "--steps", "6", "--resume", "auto"]) == 0
    assert f"settings changed: --vae {moved} -> {again}, --steps 3 -> 6" in capsys.readouterr().out
    assert (run / "samples/step0000006_cfg1.png").is_file()
