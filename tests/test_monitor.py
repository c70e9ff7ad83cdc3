"""evaluation/monitor.py: sample grids of a bounded number of classes, whatever the class count, and GIFs of a bounded
number of samples and frames; diagnostics that a stop request abandons or skips, also while a GIF is encoded
(signals from outside: tests/test_preemption.py)."""

import json
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from stand_ins import Features
from test_train import tiny

import train
from evaluation.images import gif_bytes
from evaluation.monitor import GIF_FRAMES, GIF_SAMPLES, Monitor, MonitorConfig, grid_classes
from models import build_model
from sampling.options import SamplingStopped
from utils.distributed import DistInfo
from utils.preemption import TIME_LIMIT, StopRequest
from utils.runlog import RunLogger

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_grid_classes_are_few_spread_evenly_and_fixed():
    assert grid_classes(2000, 10) == list(range(0, 2000, 200))
    assert grid_classes(1000, 16) == [i * 1000 // 16 for i in range(16)] and grid_classes(1000, 16)[-1] == 937
    assert grid_classes(10, 10) == grid_classes(3, 10) + list(range(3, 10)) == list(range(10))  # all when fewer
    assert grid_classes(7, 0) == list(range(7))  # 0: every class


def make_monitor(cfg, extractor=None) -> Monitor:
    """train.py's Monitor of one process on the CPU, logging to OUT/metrics.jsonl."""
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return Monitor(MonitorConfig.of(cfg), Path(cfg.out), RunLogger(cfg.out, "disabled"), dist, fid_extractor=extractor)


def test_a_grid_of_a_2000_class_model_has_ten_rows(tmp_path):
    """The issue's case: 2000 classes drew 16,000 samples per scale and model; now 10 rows by default."""
    cfg = tiny(tmp_path / "run", samples_per_class=2, cfg_scales=(1.0,))
    model = build_model(cfg, 8, 1, 2000)
    monitor = make_monitor(cfg)
    monitor.samples(5, model, model)
    grid = Image.open(tmp_path / "run/samples/step0000005_cfg1.png")
    assert grid.size == (5 * 66 + 2, 10 * 66 + 2)  # 2 EMA samples, a blank, 2 raw; 8x8 shown 8x, 2 px padding


def test_sample_classes_sets_the_rows_of_the_grid(tmp_path):
    assert train.parse_args(["--sample-classes", "3"]).sample_classes == 3
    train.main(tiny(tmp_path / "run", steps=2, sample_every=2, sample_classes=3))
    assert Image.open(tmp_path / "run/samples/step0000002_cfg1.png").size == (3 * 66 + 2, 3 * 66 + 2)


class StopAfter:
    """A StopRequest of one process that answers None to the first ``calls`` questions and SIGTERM from then on."""

    group = None  # no process group: utils.preemption.AgreedStop asks ``requested``

    def __init__(self, calls: int):
        self.calls = calls

    def requested(self, seconds: float = 0.0) -> int | None:
        self.calls -= 1
        return signal.SIGTERM if self.calls < 0 else None

    check = requested


def test_a_stop_while_computing_the_real_statistics_abandons_fid_until_the_next_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = tiny(tmp_path / "run", fid_every=2, fid_samples=20)
    model = build_model(cfg, 8, 1, 10)
    fid = make_monitor(cfg, Features())
    fid(2, model, model, last=False, stop=StopAfter(3))  # asked before the FID, then at each batch of real images
    assert "FID at step 2 abandoned (SIGTERM)" in capsys.readouterr().err
    assert fid.fid_state == "not loaded" and not (tmp_path / "cache").exists()  # no half statistics cached
    fid(4, model, model, last=False, stop=StopAfter(10**6))
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/fid" in r] == [4]


def test_a_diagnostic_whose_last_run_would_not_fit_the_budget_is_skipped(tmp_path, capsys):
    cfg = tiny(tmp_path / "run", sample_every=2)
    model = build_model(cfg, 8, 1, 10)
    grids = make_monitor(cfg)
    grids.seconds["sample grids"] = 120.0  # the last grids took two minutes; one minute is left
    stop = StopRequest(time_limit=1.0)
    try:
        grids(2, model, model, last=False, stop=stop)
    finally:
        stop.close()
    assert grids.reason == TIME_LIMIT and "sample grids at step 2 skipped (--time-limit)" in capsys.readouterr().err
    assert not (tmp_path / "run/samples").exists()


def test_the_gif_shows_a_bounded_part_of_a_large_grid(tmp_path):
    """The issue's case: 400 per class made a GIF of 4,000 images x 21 frames; the GIF now holds the first
    GIF_SAMPLES of each class row and at most GIF_FRAMES frames, the PNG grid all of them."""
    cfg = tiny(tmp_path / "run", samples_per_class=12, sample_steps=40, cfg_scales=(1.0,), sample_classes=3)
    model = build_model(cfg, 8, 1, 10)
    with torch.no_grad():  # an untrained DiT outputs zero: its frames would all be the noise, merged into one
        for p in model.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    make_monitor(cfg).samples(5, model, model)
    assert Image.open(tmp_path / "run/samples/step0000005_cfg1.png").size == ((2 * 12 + 1) * 66 + 2, 3 * 66 + 2)
    gif = Image.open(tmp_path / "run/samples/step0000005_cfg1.gif")
    assert GIF_SAMPLES == 8 and gif.size == (8 * 66 + 2, 3 * 66 + 2)
    assert 10 <= gif.n_frames <= GIF_FRAMES == 20  # identical neighbours merge
    small = tiny(tmp_path / "small", samples_per_class=3, sample_steps=4, cfg_scales=(1.0,), sample_classes=3)
    make_monitor(small).samples(5, model, model)
    gif = Image.open(tmp_path / "small/samples/step0000005_cfg1.gif")
    assert gif.size == (3 * 66 + 2, 3 * 66 + 2) and gif.n_frames <= 5


def test_gif_encoding_asks_before_each_frame():
    trajectory = torch.linspace(-1, 1, 6).view(6, 1, 1, 1, 1).expand(6, 4, 1, 8, 8)
    calls = []
    plain = gif_bytes(trajectory, nrow=2)
    assert gif_bytes(trajectory, nrow=2, should_stop=lambda: calls.append(1) is None and False) == plain
    assert len(calls) == 6
    with pytest.raises(SamplingStopped, match="before GIF frame 4 of 6"):
        gif_bytes(trajectory, nrow=2, should_stop=lambda: calls.append(1) is None and len(calls) > 9)


def test_a_stop_while_the_last_gif_is_encoded_writes_nothing(tmp_path, capsys):
    """Every file of every scale is encoded before any is written: a stop at the last GIF frame leaves no file."""
    cfg = tiny(tmp_path / "run", sample_every=2, sample_steps=6, cfg_scales=(1.0, 2.0))
    model = build_model(cfg, 8, 1, 10)
    counting = StopAfter(10**6)
    make_monitor(tiny(tmp_path / "counted", sample_every=2, sample_steps=6, cfg_scales=(1.0, 2.0)))(
        2, model, model, last=False, stop=counting
    )
    asked = 10**6 - counting.calls
    assert asked == 1 + 2 * 2 * 6 + 2 * 7  # before the grids, 6 steps of EMA and raw at 2 scales, 7 frames each GIF
    monitor = make_monitor(cfg)
    monitor(2, model, model, last=False, stop=StopAfter(asked - 1))  # None to all but the last question
    assert "sample grids at step 2 abandoned (SIGTERM)" in capsys.readouterr().err
    assert not (tmp_path / "run/samples").exists() and len(list((tmp_path / "counted/samples").iterdir())) == 4
