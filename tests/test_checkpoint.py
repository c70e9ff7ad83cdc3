"""utils/checkpoint.py: safe (weights_only) loading refuses pickled objects; format versions are checked."""

import collections

import pytest
import torch

from models.dit import DiT
from utils.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint


class Payload:
    """Any class: unpickling it could run code (a __reduce__), so the loader must never build it."""

    built = False

    def __reduce__(self):
        return (Payload._build, ())

    @staticmethod
    def _build():
        Payload.built = True
        return Payload()


def tiny_state() -> dict:
    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=2)
    return {"model_config": model.config, "model": model.state_dict(), "config": {"scales": (1.0, 2.5)}}


def test_round_trip_with_the_format_version(tmp_path):
    state = tiny_state()
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["format_version"] == FORMAT_VERSION and loaded["config"] == {"scales": (1.0, 2.5)}
    model = model_from_checkpoint(loaded, ema=False)
    for k, v in state["model"].items():
        assert torch.equal(model.state_dict()[k], v)


def test_a_pickled_object_is_refused_and_never_built(tmp_path):
    torch.save({**tiny_state(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*pickled python object"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        model_from_checkpoint(tmp_path / "evil.pt")
    assert not Payload.built
    # Plain containers are fine.
    save_checkpoint({**tiny_state(), "extra": collections.OrderedDict(a=[1, 2.0, None, "x"])}, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["extra"] == {"a": [1, 2.0, None, "x"]}


def test_a_newer_format_version_is_refused(tmp_path):
    torch.save({**tiny_state(), "format_version": FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer than this code"):
        load_checkpoint(tmp_path / "new.pt")


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="model_config"):
        load_checkpoint(tmp_path / "partial.pt")
