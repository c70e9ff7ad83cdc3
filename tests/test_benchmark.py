"""The benchmark runs end to end at tiny size and reports consistent numbers; the official reference network is
the project's DiT with registers and qk-norm switched off. No timing is ever asserted."""

import dataclasses
import json

import pytest
import torch
from stand_ins import all_close

import train
from benchmarks.benchmark import BenchConfig, bench_train, cli, command_line, main, make_dataset, parse_args
from benchmarks.measure import PHASES, gpu_bf16_peak, summarize
from benchmarks.official_dit import official_dit, official_update_ema
from models.cost import count_params, forward_flops
from models.dit import DiT_models

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> BenchConfig:
    cfg = BenchConfig(
        model="DiT-XS/2",
        hidden_size=32,
        depth=1,
        num_heads=2,
        image_size=8,
        batch_size=4,
        steps=2,
        warmup=1,
        num_images=16,
        sample_steps=2,
        sample_n=3,
        cfg_scale=3.0,
        peak_seconds=0.05,
        threads=1,
        device="cpu",
    )
    return dataclasses.replace(cfg, **overrides)


@pytest.mark.parametrize(
    "objective, args, repa",
    [("flow", dict(t_mean=0.3), 0), ("meanflow", dict(mf_equal_fraction=0.5, mf_omega=1.5), 0), ("flow", {}, 0.5)],
)
def test_the_benchmark_times_train_pys_own_step(objective, args, repa, tmp_path):
    """3 steps of the benchmark and 3 steps of train.py from the same seed and settings: the same weights, bit for
    bit (the benchmark counts its host syncs on the last warm-up step, which trains like the others); with REPA too."""
    from test_repa import export

    encoder = dict(repa_weight=repa, repa_encoder=str(export(tmp_path)), repa_projector_dim=8) if repa else {}
    model = dict(model="DiT-XS/2", hidden_size=32, depth=1, num_heads=2, num_registers=2, class_dropout=0.2)
    same = dict(
        image_size=8,
        channels=1,
        flip=False,
        batch_size=16,
        lr=2e-3,
        ema_decay=0.9,
        grad_clip=0.5,
        seed=3,
        objective=objective,
        objective_args=args,
        compile=False,
        precision="fp32",
        device="cpu",
        **model,
        **encoder,
    )
    run = train.main(
        train.TrainConfig(
            dataset="digits",
            steps=3,
            warmup=0,
            sample_every=0,
            fid_every=0,
            ckpt_every=0,
            log_every=1,
            out=str(tmp_path / "run"),
            wandb="disabled",
            num_workers=0,
            **same,
        )
    )
    cfg = BenchConfig(dataset="digits", num_classes=10, warmup=1, steps=2, sample=False, **same)
    row, trained = bench_train(cfg, torch.device("cpu"), "fp32", make_dataset(cfg))
    for (name, a), b in zip(run["model"].state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(run["model"].final_layer.linear.weight, torch.zeros_like(trained.final_layer.linear.weight))


def test_tiny_run_writes_consistent_json(tmp_path):
    path = tmp_path / "bench" / "out.json"
    result = main(tiny(reference=True, repeats=2, json=str(path)))
    saved = json.loads(path.read_text())
    assert saved["config"]["batch_size"] == 4 and saved["command"].startswith("python -m benchmarks.benchmark")
    peak = saved["device"]["peak_flops"]
    assert saved["device"]["type"] == "cpu" and peak > 0 and "measured" in saved["device"]["peak_source"]

    model = DiT_models["DiT-XS/2"](input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2)
    plain = DiT_models["DiT-XS/2"](
        input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2, num_registers=0
    )
    assert saved["model"]["forward_flops_per_image"] == forward_flops(model)
    assert saved["model"]["params"] == count_params(model)

    rows = saved["train"]
    assert [(r["impl"], r["step"]) for r in rows] == [
        ("dit", "project"),
        ("official", "project"),
        ("official", "official"),
    ]
    for r in rows:
        flops = forward_flops(model if r["impl"] == "dit" else plain)  # the official network has no registers
        assert r["forward_flops_per_image"] == flops and r["train_flops_per_image"] == 3 * flops
        assert r["img_per_s"] > 0 and r["img_per_s"] == pytest.approx(r["steps_per_s"] * 4)
        assert r["step_ms"] == pytest.approx(1e3 / r["steps_per_s"])
        assert set(r["phase_ms"]) == set(PHASES) and all(v > 0 for v in r["phase_ms"].values())
        assert len(r["step_ms_all"]) == 2 * 2 and r["repeats"] == 2 and r["peak_memory_bytes"] > 0
        assert r["achieved_flops"] == pytest.approx(r["train_flops_per_image"] * r["img_per_s"])
        assert r["mfu"] == pytest.approx(r["achieved_flops"] / peak) and 0 < r["mfu"] < 1
        assert r["host_syncs_per_step"] is None and r["compiled"] is False
    assert rows[1]["params"] == rows[2]["params"] == count_params(plain) - 2 * 16  # less q_norm, k_norm

    guided = {s["cfg_scale"]: s for s in saved["sample"]}
    assert set(guided) == {1.0, 3.0}
    for scale, s in guided.items():
        passes = 1 if scale == 1.0 else 2  # guidance is one batched pass of 2N, none at scale 1
        assert s["nfe"] == 2 and s["n"] == 3 and s["batch_per_nfe"] == 3 * passes  # euler: one NFE per step
        assert s["precision"] == "fp32"
        assert s["img_per_s"] == pytest.approx(3 / s["seconds"]) and len(s["seconds_all"]) == 2
        assert s["achieved_flops"] == pytest.approx(passes * 3 * 2 * forward_flops(model) / s["seconds"])
    assert result["train"][0]["img_per_s"] == rows[0]["img_per_s"]


def test_summarize_takes_per_step_medians():
    # Three steps of (data, forward, backward, optimizer) seconds.
    phases = [0.1, 0.2, 0.3, 0.4] + [0.1, 0.4, 0.4, 0.1] + [0.3, 0.3, 0.3, 0.3]
    s = summarize(phases, batch_size=8)
    assert s["step_ms"] == pytest.approx(1000.0) and s["img_per_s"] == pytest.approx(8.0)
    assert s["img_per_s_mean"] == pytest.approx(8 * 3 / 3.2) and s["img_per_s_best"] == pytest.approx(8.0)
    assert s["phase_ms"] == pytest.approx({"data": 100.0, "forward": 300.0, "backward": 300.0, "optimizer": 300.0})


def test_gpu_peak_table_by_device_name():
    assert gpu_bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_bf16_peak("NVIDIA H100 PCIe") == 756.0e12
    assert gpu_bf16_peak("NVIDIA H100 NVL") == 835.5e12
    assert gpu_bf16_peak("NVIDIA H200") == 989.4e12
    assert gpu_bf16_peak("NVIDIA A100-SXM4-80GB") == 312.0e12
    assert gpu_bf16_peak("Tesla T4") is None


def test_official_reference_equals_dit_without_registers_and_qk_norm():
    # The reference is the same function as the project's DiT with its additions off: same weights, same output.
    torch.manual_seed(0)
    ours = DiT_models["DiT-XS/2"](
        input_size=8,
        in_channels=3,
        num_classes=10,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_registers=0,
        qk_norm=False,
    )
    ref = official_dit("DiT-XS/2", input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=2, num_heads=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["pos_embed"] and set(unexpected) <= {"registers"}  # fixed sin-cos; no registers
    assert count_params(ref) == count_params(ours)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g), torch.tensor([0, 3, 9, 10])
    ours.eval(), ref.eval()
    assert all_close(ref(x, t, y), ours(x, t, y))  # label 10: the null class, as in the official model


def test_official_ema_update():
    model = official_dit("DiT-XS/2", input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2)
    ema = official_dit("DiT-XS/2", input_size=8, in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters(), strict=True):
            p.fill_(1.0), q.fill_(0.0)
    official_update_ema(ema, model, decay=0.9)
    assert all(torch.allclose(q, torch.full_like(q, 0.1)) for q in ema.parameters())


def test_command_line_reproduces_config():
    cfg = tiny(reference=True, qk_norm=False, sample=False, json="x.json")
    assert parse_args(command_line(cfg).split()[3:]) == cfg


def test_bad_settings_fail_with_one_line(tmp_path, capsys):
    existing = tmp_path / "done.json"
    existing.write_text("{}")
    assert cli(["--steps", "0"]) == 2
    assert cli(["--json", str(existing), "--device", "cpu"]) == 2
    assert existing.read_text() == "{}"  # a result already written is never overwritten
    assert cli(["--no-train", "--no-sample"]) == 2
    if not torch.cuda.is_available():
        assert cli(["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("benchmark: error: ") for line in err) and len(err) == (
        4 if not torch.cuda.is_available() else 3
    )
