"""utils/checkpoint.py: safe (weights_only) loading refuses pickled objects; the training state round-trips."""

import collections

import pytest
import torch

from data import BatchStream, build_dataset
from models import model_from_checkpoint
from models.dit import DiT
from training.resume import OPTIONAL_KEYS, check_resume, restore_training_state, training_state
from utils.checkpoint import TRAINING_KEYS, CheckpointError, load_checkpoint, newest_readable, save_checkpoint
from utils.config import ConfigError
from utils.ema import EMA
from utils.optim import build_adamw
from utils.rng import rng_state


class Payload:
    """Any class: unpickling it could run code (a __reduce__), so the loader must never build it."""

    built = False

    def __reduce__(self):
        return (Payload._build, ())

    @staticmethod
    def _build():
        Payload.built = True
        return Payload()


def tiny_model(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=10)


def tiny_state() -> dict:
    model = tiny_model()
    return {"model_config": model.config, "model": model.state_dict(), "config": {"scales": (1.0, 2.5)}}


def test_round_trip(tmp_path):
    state = tiny_state()
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["config"] == {"scales": (1.0, 2.5)}
    model = model_from_checkpoint(loaded, ema=False)
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        model_from_checkpoint(loaded)


def test_a_pickled_object_is_refused_and_never_built(tmp_path):
    torch.save({**tiny_state(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .* tensors and plain values"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        model_from_checkpoint(tmp_path / "evil.pt")
    assert not Payload.built
    # Plain containers are fine.
    save_checkpoint({**tiny_state(), "extra": collections.OrderedDict(a=[1, 2.0, None, "x"])}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["extra"] == {"a": [1, 2.0, None, "x"]}


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(tmp_path / "partial.pt")


def test_a_damaged_file_is_described_and_the_newest_readable_one_found(tmp_path):
    model, ema, opt, stream = run_objects(seed=0)
    for step in (4, 8):
        state = training_state(
            model=model,
            ema=ema,
            optimizer=opt,
            stream=stream,
            step=step,
            skipped_steps=0,
            config={},
            rng=[rng_state()],
            world_size=1,
            wandb_id=None,
        )
        save_checkpoint(state, tmp_path / f"{step:07d}.pt")
    data = (tmp_path / "0000008.pt").read_bytes()
    (tmp_path / "0000008.pt").write_bytes(data[: len(data) - 100])  # the end cut off, as a full disk or a kill
    (tmp_path / "0000012.pt").write_bytes(b"")
    save_checkpoint(tiny_state(), tmp_path / "0000016.pt")  # weights only: not a state to continue from
    with pytest.raises(CheckpointError, match=r"0000008.pt: the file is truncated \(\d+ bytes, the end of the archive"):
        load_checkpoint(tmp_path / "0000008.pt")
    with pytest.raises(CheckpointError, match="the file is empty"):
        load_checkpoint(tmp_path / "0000012.pt")
    assert newest_readable(tmp_path) == (tmp_path / "0000004.pt", 4)
    assert newest_readable(tmp_path / "nothing-here") is None


def run_objects(seed: int):
    model = tiny_model(seed)
    ema, opt = EMA(model, 0.9), build_adamw(model.parameters(), lr=1e-2)
    stream = BatchStream(build_dataset("digits", image_size=8, channels=1), 16, seed=0, flip=False, on_device=True)
    return model, ema, opt, stream


def test_training_state_holds_every_key_and_restores_every_object(tmp_path):
    model, ema, opt, stream = run_objects(seed=0)
    for _ in range(3):  # moments, an EMA that differs from the weights, a data position
        x, y = next(stream)
        model(x, torch.rand(16), y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    config = {"dataset": "digits", "batch_size": 16}
    state = training_state(
        model=model,
        ema=ema,
        optimizer=opt,
        stream=stream,
        step=3,
        skipped_steps=1,
        config=config,
        rng=[rng_state()],
        world_size=1,
        wandb_id="abc",
    )
    assert set(state) == set(TRAINING_KEYS + OPTIONAL_KEYS)  # the module docstring lists exactly these
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    check_resume(loaded, config, model.config)
    # The EMA weights are what model_from_checkpoint builds by default.
    for k, v in model_from_checkpoint(loaded).state_dict().items():
        assert torch.equal(v, ema.model.state_dict()[k])

    model2, ema2, opt2, stream2 = run_objects(seed=1)
    resumed = restore_training_state(
        loaded, model=model2, ema=ema2, optimizer=opt2, stream=stream2, rank=0, world_size=1
    )
    assert (resumed.step, resumed.skipped_steps, resumed.wandb_id) == (3, 1, "abc") and resumed.rng is not None
    assert ema2.num_updates == 3 and stream2.state_dict() == stream.state_dict()
    for a, b in ((model, model2), (ema.model, ema2.model)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    assert torch.equal(next(stream)[0], next(stream2)[0])  # the same next batch

    # Another number of processes: the next epoch, and fresh generators.
    other = restore_training_state(loaded, model=model2, ema=ema2, optimizer=opt2, stream=stream2, rank=0, world_size=2)
    assert other.rng is None and stream2.state_dict() == {**stream.state_dict(), "epoch": stream.epoch + 1, "index": 0}


def test_check_resume_refuses_weights_only_and_other_settings():
    model, ema, opt, stream = run_objects(seed=0)
    config = {"dataset": "digits", "batch_size": 16}
    state = training_state(
        model=model,
        ema=ema,
        optimizer=opt,
        stream=stream,
        step=0,
        skipped_steps=0,
        config=config,
        rng=[rng_state()],
        world_size=1,
        wandb_id=None,
    )
    with pytest.raises(CheckpointError, match="weights only"):
        check_resume({k: state[k] for k in ("model_config", "model", "ema")}, config, model.config)
    with pytest.raises(ConfigError, match="--batch-size 16 -> 32"):
        check_resume(state, {**config, "batch_size": 32}, model.config)
    with pytest.raises(ConfigError, match="model"):
        check_resume(state, config, {**model.config, "depth": 2})
