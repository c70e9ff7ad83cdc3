"""The README's "Extending" recipes, followed literally: a new objective (the README's own code) and a new dataset,
each written in a module of its own and registered with one line, train through train.main, resume exactly and
sample; a new MLP (the README's own code) is one class and one line in models/blocks.py."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import models.blocks
import train
from data import DATASETS
from objectives import OBJECTIVES
from sampling import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_code(first_line: str) -> str:
    """The README's python block that starts with first_line."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if b.startswith(first_line)]
    assert len(blocks) == 1, f"the README's Extending holds one python block that starts with {first_line!r}"
    return blocks[0]


# The README's objective, and a dataset of the README's form with real content (the README's leaves it open).
PLUGIN = (
    readme_code("# objectives/l1.py")
    + '''

import torch

from data.datasets import TensorImageDataset


class Stripes(TensorImageDataset):
    """Two classes of 8x8 images: bright rows (class 0) or bright columns (class 1), at random phases."""

    in_memory = True

    @classmethod
    def build(cls, root, image_size, channels, train=True, download=True):
        g = torch.Generator().manual_seed(0)
        phase = torch.randint(0, 2, (64,), generator=g)
        label = torch.arange(64) % 2
        grid = (torch.arange(image_size) + phase.view(-1, 1)) % 2  # (64, size)
        rows = grid.view(64, image_size, 1).expand(64, image_size, image_size)
        images = torch.where(label.view(-1, 1, 1) == 0, rows, rows.transpose(1, 2)) * 255
        images = images.to(torch.uint8).unsqueeze(1).expand(64, channels, image_size, image_size)
        return cls(images.contiguous(), label, classes=["rows", "columns"])
'''
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plug-in module, imported, and its two registry lines."""
    path = tmp_path / "stripes_plugin.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("stripes_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(OBJECTIVES, "l1", module.L1Flow)  # OBJECTIVES["l1"] = L1Flow
    monkeypatch.setitem(DATASETS, "stripes", module.Stripes)  # DATASETS["stripes"] = Stripes
    return module


def run(out: Path, steps: int, **overrides) -> dict:
    flags = [
        "--objective",
        "l1",
        "--huber-c",
        "0.05",
        "--dataset",
        "stripes",
        "--image-size",
        "8",
        "--channels",
        "1",
        "--no-flip",
        "--model",
        "DiT-XS/2",
        "--hidden-size",
        "32",
        "--depth",
        "1",
        "--num-heads",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--warmup",
        "0",
        "--steps",
        str(steps),
        "--ckpt-every",
        "2",
        "--log-every",
        "1",
        "--sample-every",
        "0",
        "--fid-every",
        "0",
        "--wandb",
        "disabled",
        "--out",
        str(out),
    ]
    for key, value in overrides.items():
        flags += [f"--{key.replace('_', '-')}", value]
    return train.main(train.parse_args(flags))


def test_a_new_objective_and_dataset_train_resume_and_sample(plugin, tmp_path):
    cfg = train.parse_args(["--objective", "l1", "--huber-c", "0.05", "--dataset", "stripes"])
    assert isinstance(cfg.build_objective(), plugin.L1Flow) and cfg.objective_args == {
        "huber_c": 0.05,
    }
    whole = run(tmp_path / "whole", 3)
    assert whole["step"] == 3 and len(whole["losses"]) == 3 and all(loss > 0 for _, loss in whole["losses"])
    part = run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume="yes")
    assert part["step"] == 2 and resumed["step"] == 3
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # resumed exactly
    assert whole["losses"][-1] == resumed["losses"][-1]
    saved = torch.load(whole["checkpoint"], weights_only=True)["config"]
    assert saved["objective"] == "l1" and saved["objective_args"]["huber_c"] == 0.05 and saved["dataset"] == "stripes"
    sampler = Sampler.from_checkpoint(whole["checkpoint"], device="cpu")
    out = sampler.generate(4, torch.tensor([0, 1, 0, 1]), steps=2, seed=0)
    assert out.images.shape == (4, 1, 8, 8) and out.nfe == 4 and sampler.options.method == "heun"
    assert torch.isfinite(out.images).all()


@pytest.mark.skipif(not isinstance(models.blocks.MLPS, dict), reason="MLPS is not a registry of classes here")
def test_a_new_mlp_is_one_class_and_one_registry_line(plugin, tmp_path):
    """The README's MLP, run as if written into models/blocks.py (its imports are that module's), trains with
    --mlp, is recorded in the checkpoint and rebuilt from it."""
    namespace = dict(vars(models.blocks))
    exec(readme_code("class ReLU2"), namespace)  # the class and its line MLPS["relu2"] = ReLU2
    try:
        result = run(tmp_path / "relu2", 2, mlp="relu2")
        assert isinstance(result["model"].blocks[0].mlp, namespace["ReLU2"]) and result["step"] == 2
        saved = torch.load(result["checkpoint"], weights_only=True)["config"]
        assert saved["mlp"] == "relu2"
        sampler = Sampler.from_checkpoint(result["checkpoint"], device="cpu")
        assert isinstance(sampler.model.blocks[0].mlp, namespace["ReLU2"])
        assert torch.isfinite(sampler.sample(2, torch.tensor([0, 1]), steps=2, seed=0)).all()
    finally:
        models.blocks.MLPS.pop("relu2", None)
