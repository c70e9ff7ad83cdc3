"""Stand-ins and comparisons shared by several test files (importable: pytest puts tests/ on sys.path)."""

import os

import torch


class Features(torch.nn.Module):
    """A small fixed feature extractor standing in for Inception: uint8 (N, 3, H, W) -> (N, 12)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = torch.nn.Conv2d(3, 12, 3)

    def forward(self, x):
        return self.conv(x.float() / 255).relu().mean((2, 3))


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Elementwise |actual - expected| <= rel * max |expected|: a tolerance scaled to the magnitude of the
    values, so comparisons hold on any CPU (float kernels differ between Intel and AMD, AVX2 and AVX-512)."""
    scale = expected.detach().abs().max().double().clamp_min(1e-30)
    return (actual.detach().double() - expected.detach().double()).abs() <= rel * scale


def all_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> bool:
    """``close`` everywhere."""
    return bool(close(actual, expected, rel).all())


def wandb_history(run_dir, timeout: float = 60) -> list[dict]:
    """The history rows (dicts of key -> JSON value) of an offline wandb run, read from its run-ID.wandb file once
    the run's exit record is there (wandb's service writes the file after ``finish`` returns).

    The file is a LevelDB-style log (32 KiB blocks; records of a 7-byte header - crc32, length, type - and data,
    split across blocks as FIRST/MIDDLE/LAST) after a 7-byte ":W&B" file header; each record is a protobuf."""
    import json
    import time
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        data = next(Path(run_dir).glob("*.wandb")).read_bytes()
        rows, kinds, pos, parts = [], set(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a header is padding
                pos += left
                continue
            length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
            parts, pos = parts + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = wandb_internal_pb2.Record()
                record.ParseFromString(parts)
                kinds.add(record.WhichOneof("record_type"))
                if record.WhichOneof("record_type") == "history":
                    rows.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    )
                parts = b""
        if "exit" in kinds or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


# The environment of the processes a test starts (torchrun workers, train.py runs): one thread each and OpenMP
# threads that sleep rather than spin when idle, so two processes on a 2-core machine do not starve each other
# (two spinning 2-thread processes measured 7.4 s a step against 0.64 s with OMP_WAIT_POLICY=PASSIVE).
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled"}
