"""The GPU paths that the CPU suite only reaches through their fallbacks: bf16 autocast, flash attention, guidance,
the sampler's precision, the on-device data path, fused AdamW without host syncs, and NCCL.

Every test here is marked ``gpu`` and skipped without CUDA, so the normal suite only collects them.
``python -m pytest -m gpu tests/test_gpu.py`` runs them on a GPU machine; ``python -m benchmarks.gpu_check run``
does so as its first part. Numbers worth reading (errors, kernel names, syncs) are attached to the tests with
``record_property`` and land in the junit XML that benchmarks/gpu_check.py summarises.

Float comparisons are relative to the magnitude of the reference values. The fp32 references run with TF32
off, so they are exact to float32 rounding; bf16 against fp32 is held to a few percent (measured on the CPU's
bf16 autocast for DiT-S/2: 0.4% forward, 0.3% gradients, 1% for the worst single tensor).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from datetime import timedelta

import pytest
import torch
from torch.utils.data import Dataset

from data import BatchStream
from models.dit import DiT_models
from objectives.flow import FlowMatching
from sampler import Sampler
from utils.ema import EMA
from utils.optim import StepStats, TrainStep, build_adamw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (python -m benchmarks.gpu_check run)"),
]

CUDA = torch.device("cuda")


# ---------------------------------------------------------------------------------------------- helpers


# The blocks of --recipe lightning (models/blocks.py: SwiGLU, RMSNorm, RoPE) and JiT's in-context class tokens.
LIGHTNING_BLOCKS = dict(mlp_type="swiglu", norm_type="rmsnorm", rope=True, class_tokens=4)


def dit_s2(seed: int = 0, device: torch.device = CUDA, **blocks) -> torch.nn.Module:
    """DiT-S/2 at 32x32x3, 10 classes (the README's model: head dim 64, 256 patches + 4 registers), with every
    weight moved off its initial value, so that the zero-initialised output layers do not make outputs zero;
    blocks: further DiT arguments (LIGHTNING_BLOCKS)."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-S/2"](input_size=32, in_channels=3, num_classes=10, **blocks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model.to(device)


def inputs(n: int = 8, seed: int = 1, device: torch.device = CUDA):
    """Images (n, 3, 32, 32), times (n,) and labels (n,) on device, from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error at the scale of the values."""
    expected = expected.detach().double()
    return ((actual.detach().double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def exact_fp32():
    """float32 matmuls and convolutions without TF32 (train.py turns TF32 on), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def bf16(enabled: bool = True):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


@contextlib.contextmanager
def host_syncs():
    """Collects 'file:line: message' for every host synchronisation inside (torch's sync debug mode)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message).lower()]


class Pictures(Dataset):
    """n seeded random uint8 images (3, size, size) with labels: random pixels are never mirror-symmetric, so a
    flipped image is told from an unflipped one. Items for the loader path, .images and .labels for on_device."""

    def __init__(self, n: int = 64, size: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class ScaledFlow(FlowMatching):
    """The flow objective with its loss multiplied by ``scale`` (nan or inf: a non-finite step)."""

    scale: float = 1.0

    def loss(self, net, x1, y=None):
        terms = super().loss(net, x1, y)
        return terms._replace(loss=terms.loss * self.scale, mse=terms.mse * self.scale)


class Trainer:
    """train.py's own step (utils.optim.TrainStep: bf16 autocast, backward, guarded_step with clipping and fused
    AdamW, EMA.update, StepStats) on batches of the on-device BatchStream."""

    def __init__(self, model: torch.nn.Module, batch: int = 8):
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_adamw(model.parameters(), lr=1e-4)
        self.ema = EMA(model, 0.999)
        self.stats = StepStats(CUDA)
        self.objective = ScaledFlow()
        self.train_step = TrainStep(model, self.objective, self.opt, self.ema, self.stats, "bf16", grad_clip=1.0)
        # 64 images in batches of 8: an epoch boundary (which copies the new epoch's order to the GPU) every 8 steps
        self.stream = BatchStream(Pictures(64, 32), batch, seed=0, device=CUDA, flip=True, on_device=True)

    def step(self, loss_scale: float = 1.0) -> torch.Tensor:
        x, y = next(self.stream)
        self.objective.scale = loss_scale
        return self.train_step(x, y, lr=1e-4)


# ---------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_forward_and_backward_match_fp32(record_property):
    model = dit_s2()
    x, t, y = inputs()
    flow = FlowMatching()
    out, loss, grads = {}, {}, {}
    for precision in ("fp32", "bf16"):
        with exact_fp32():
            model.eval()
            with torch.no_grad(), bf16(precision == "bf16"):
                out[precision] = model(x, t, y).float()
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(2)  # the same noise, times and label dropout for both precisions
            with bf16(precision == "bf16"):
                loss[precision] = flow.loss(model, x, y).loss
            loss[precision].backward()
        grads[precision] = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    flat = {k: torch.cat([g.flatten() for g in v.values()]) for k, v in grads.items()}
    forward, grad = rel_err(out["bf16"], out["fp32"]), rel_err(flat["bf16"], flat["fp32"])
    per_tensor = {
        n: rel_err(grads["bf16"][n], g) for n, g in grads["fp32"].items() if g.norm() > 1e-3 * flat["fp32"].norm()
    }
    worst = max(per_tensor, key=per_tensor.get)
    record_property("bf16_forward_rel_err", forward)
    record_property("bf16_grad_rel_err", grad)
    record_property("bf16_worst_tensor_grad_rel_err", f"{per_tensor[worst]:.3g} ({worst})")
    assert out["fp32"].abs().max() > 0.1  # the comparison is not between zeros
    assert torch.isfinite(out["bf16"]).all() and torch.isfinite(flat["bf16"]).all()
    assert forward < 2e-2, forward
    assert abs(loss["bf16"].item() - loss["fp32"].item()) <= 1e-2 * abs(loss["fp32"].item())
    assert grad < 2e-2, grad
    assert per_tensor[worst] < 6e-2, (worst, per_tensor[worst])


def test_flash_attention_is_the_sdpa_kernel_of_a_bf16_training_step(record_property):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model = dit_s2().train()
    x, t, y = inputs()
    # 1. Restricted to flash attention, forward and backward run: sdpa_kernel raises when flash cannot take them.
    torch.manual_seed(3)  # the same label dropout in both passes
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), bf16():
        only_flash = model(x, t, y)
    only_flash.float().square().mean().backward()
    model.zero_grad(set_to_none=True)

    # 2. With every backend allowed, as in training, the dispatcher picks flash.
    torch.manual_seed(3)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with bf16():
            out = model(x, t, y)
        out.float().square().mean().backward()
        torch.cuda.synchronize()
    events = prof.key_averages()
    names = {e.key for e in events}
    kernels = {e.key for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA}
    attention = sorted(n for n in names if any(k in n.lower() for k in ("attention", "flash", "fmha", "sdpa")))
    record_property("attention_ops_and_kernels", "; ".join(n[:120] for n in attention))
    record_property("cuda_kernels_profiled", len(kernels))
    assert "aten::_scaled_dot_product_flash_attention" in names, attention
    assert "aten::_scaled_dot_product_flash_attention_backward" in names, attention
    others = ("aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")
    assert not names & set(others), attention
    if kernels:  # the profiler saw the device's kernels (CUPTI works): flash's own are among them
        assert any("flash" in k.lower() for k in kernels), attention
    assert torch.allclose(out.float(), only_flash.float(), rtol=0, atol=1e-2 * only_flash.float().abs().max().item())


def test_lightning_blocks_in_bf16_with_flash_attention_and_compiled(record_property):
    """SwiGLU, RMSNorm, RoPE and class tokens: bf16 close to fp32 (forward, gradients), forward and backward with
    flash attention alone (RoPE hands it bf16 queries and keys), guidance equal to its formula, and
    torch.compile equal to eager."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = dit_s2(**LIGHTNING_BLOCKS)
    x, t, y = inputs()
    flow = FlowMatching(cosine_loss_weight=1.0)
    out, grads = {}, {}
    for precision in ("fp32", "bf16"):
        with exact_fp32():
            model.eval()
            with torch.no_grad(), bf16(precision == "bf16"):
                out[precision] = model(x, t, y).float()
            model.train()
            model.zero_grad(set_to_none=True)
            torch.manual_seed(2)
            with bf16(precision == "bf16"):
                flow.loss(model, x, y).loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
    forward, grad = rel_err(out["bf16"], out["fp32"]), rel_err(grads["bf16"], grads["fp32"])
    record_property("lightning_bf16_forward_rel_err", forward)
    record_property("lightning_bf16_grad_rel_err", grad)
    assert out["fp32"].abs().max() > 0.1 and forward < 2e-2 and grad < 3e-2, (forward, grad)

    model.zero_grad(set_to_none=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), bf16():
        model(x, t, y).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    model.eval()
    with exact_fp32(), torch.no_grad():
        v = model.forward_with_cfg(x, t, y, 3.0)
        v_c, v_u = model.forward_with_cfg(x, t, y, 1.0), model.forward_with_cfg(x, t, y, 0.0)
        assert max_err(v, v_u + 3.0 * (v_c - v_u)) < 1e-4
        compiled = torch.compile(model)(x, t, y)
        eager = model(x, t, y)
    err = rel_err(compiled.float(), eager.float())
    record_property("lightning_compiled_rel_err", err)
    assert err < 1e-4, err


# ---------------------------------------------------------------------------------------------- guidance, sampler


def test_forward_with_cfg_on_cuda_equals_its_formula(record_property):
    model = dit_s2().eval()
    x, t, y = inputs()
    for precision, scale, tol in (("fp32", 4.0, 1e-4), ("bf16", 2.0, 2e-2), ("bf16", 4.0, 2e-2)):
        with exact_fp32(), torch.no_grad(), bf16(precision == "bf16"):
            v_cond = model.forward_with_cfg(x, t, y, 1.0)  # scale 1: the conditional pass of N alone
            v_null = model.forward_with_cfg(x, t, y, 0.0)  # scale 0: v_u + 0 (v_c - v_u) = v_u
            v = model.forward_with_cfg(x, t, y, scale)  # one batched pass of 2N
            plain = model(x, t, y)
        expected = v_null.float() + scale * (v_cond.float() - v_null.float())
        err = max_err(v.float(), expected)
        record_property(f"cfg_{precision}_scale{scale:g}_max_err", err)
        assert v.shape == x.shape and err < tol, (precision, scale, err)
        assert max_err(v_cond.float(), plain.float()) < 1e-6  # eval mode: no label dropout in either
        assert max_err(v_null.float(), v_cond.float()) > 1e-3  # the null class changes the velocity


def test_sampler_in_bf16_returns_float32_close_to_fp32(record_property):
    model = dit_s2()
    y = torch.arange(8) % 10
    out = {}
    for precision in ("auto", "fp32"):
        sampler = Sampler(model, steps=4, method="heun", precision=precision)
        with exact_fp32():
            result = sampler.generate(8, y, cfg_scale=3.0, seed=0, trajectory=True)
        images, trajectory = result.images, result.trajectory
        assert result.precision == ("bf16" if precision == "auto" else "fp32")  # auto is bf16 on CUDA
        assert images.dtype == torch.float32 and images.device.type == "cuda" and images.shape == (8, 3, 32, 32)
        assert trajectory.dtype == torch.float32 and torch.isfinite(trajectory).all()
        assert result.nfe == 8  # heun: 2 per step, guided calls count once
        out[precision] = images
    diff = (out["auto"] - out["fp32"]).abs()
    record_property("sampler_bf16_vs_fp32_max_abs", diff.max().item())
    assert 0 <= out["auto"].min() and out["auto"].max() <= 1 and out["auto"].std() > 0.01
    assert diff.max() < 5e-2 and diff.mean() < 1e-2, (diff.max().item(), diff.mean().item())


# ---------------------------------------------------------------------------------------------- data


def test_on_device_data_path_flips_on_the_gpu_like_the_cpu_path(record_property):
    data = Pictures(64, 8)
    gpu = BatchStream(data, 16, seed=3, device=CUDA, flip=True, on_device=True)
    cpu = BatchStream(data, 16, seed=3, device="cpu", flip=True, on_device=False)
    flipped = unflipped = 0
    syncs: list[str] = []
    for i in range(6):  # an epoch of 4 batches and two of the next
        if i % 4 == 0:
            xg, yg = next(gpu)  # a new epoch copies its order and flips to the GPU once
        else:
            with host_syncs() as found:
                xg, yg = next(gpu)
            syncs += found
        xc, yc = next(cpu)
        assert xg.device.type == "cuda" and yg.device.type == "cuda" and xg.dtype == torch.float32
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)  # the same stream on either path
        pixels = ((xg + 1) * 127.5).round().to(torch.uint8).cpu()
        for image in pixels:  # each batch image is a dataset image, mirrored or not
            same = (data.images == image).flatten(1).all(1)
            mirror = (data.images.flip(-1) == image).flatten(1).all(1)
            assert int(same.sum() + mirror.sum()) == 1
            flipped, unflipped = flipped + int(mirror.any()), unflipped + int(same.any())
    record_property("flipped_of_96", flipped)
    record_property("host_syncs_per_batch_inside_an_epoch", len(syncs) / 4)
    assert flipped > 10 and unflipped > 10, (flipped, unflipped)
    assert syncs == [], syncs  # the set is on the GPU: a batch inside an epoch copies nothing from the host


# ---------------------------------------------------------------------------------------------- optimizer step


def test_a_training_step_makes_no_host_synchronisation(record_property):
    trainer = Trainer(dit_s2())
    assert trainer.opt.defaults.get("fused"), "AdamW is not fused on CUDA"
    for _ in range(2):  # warm-up: optimizer state, the first epoch's plan, cuBLAS handles
        trainer.step()
    with host_syncs() as found:
        for _ in range(3):
            trainer.step()
    record_property("host_syncs_per_step", len(found) / 3)
    assert found == [], "\n".join(found)
    stats = trainer.stats.read()
    assert stats["skipped"] == 0 and stats["good_steps"] == 5 and stats["loss"] > 0


def test_a_nonfinite_step_changes_nothing_on_the_device(record_property):
    trainer = Trainer(dit_s2())
    for _ in range(3):
        trainer.step()
    model, opt, ema = trainer.model, trainer.opt, trainer.ema
    before = (
        [p.detach().clone() for p in model.parameters()],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in trainer.params],
        [p.clone() for p in ema.model.parameters()],
    )
    for scale in (float("nan"), float("inf")):
        with host_syncs() as found:
            ok = trainer.step(loss_scale=scale)
        assert found == [], "\n".join(found)
        assert not ok.item()
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters(), strict=True))
    for saved, p in zip(before[1], trainer.params, strict=True):
        assert all(torch.equal(v, opt.state[p][k]) for k, v in saved.items())  # moments and step count
    assert all(torch.equal(a, b) for a, b in zip(before[2], ema.model.parameters(), strict=True))
    stats = trainer.stats.read()
    record_property("nonfinite_steps_skipped", stats["skipped"])
    assert stats["skipped"] == 2 and stats["good_steps"] == 3
    assert trainer.step().item()  # and training goes on


# ---------------------------------------------------------------------------------------------- NCCL


def test_nccl_process_group_runs_a_ddp_training_step(tmp_path, record_property):
    """One GPU allows one NCCL rank: this proves the library loads, a collective runs and DDP trains over it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    assert dist.is_available() and dist.is_nccl_available()
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1, timeout=timedelta(seconds=120)
    )
    try:
        version = torch.cuda.nccl.version()  # a tuple, or an int in older torch
        record_property("nccl_version", ".".join(map(str, version)) if isinstance(version, tuple) else version)
        value = torch.arange(4.0, device=CUDA)
        dist.all_reduce(value)
        assert torch.equal(value.cpu(), torch.arange(4.0))
        model = dit_s2()
        net = DistributedDataParallel(model, device_ids=[0])
        params = list(model.parameters())
        opt, stats = build_adamw(params, lr=1e-3), StepStats(CUDA)
        x, t, y = inputs()
        before = [p.detach().clone() for p in params]
        ok = TrainStep(net, FlowMatching(), opt, EMA(model, 0.999), stats, "bf16", grad_clip=1.0)(x, y, lr=1e-3)
        grad_norm = stats.read()["grad_norm"]
        assert ok.item() and math.isfinite(grad_norm) and grad_norm > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
    finally:
        dist.destroy_process_group()
