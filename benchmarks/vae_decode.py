"""VAE decode throughput of latent sampling: SD-VAE's architecture with random weights, decoding 4 x 32 x 32 latents.

    python -m benchmarks.vae_decode --device cuda --batch-size 32 --json vae.json    # 256 px images, bf16 on CUDA
    python -m benchmarks.vae_decode --quick                                         # tiny VAE on the CPU

The network is built from the published config of ``stabilityai/sd-vae-ft-ema`` (the VAE of DiT and of this
repository's ImageNet runs), with random weights: decoding costs the same whatever the weights, so nothing is
downloaded. It decodes through ``models.vae.LatentCodec`` exactly as sampling does (bf16 autocast on CUDA).
Prints and writes images/s, the time per batch and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.vae import LatentCodec

# stabilityai/sd-vae-ft-ema/config.json (the AutoencoderKL arguments that shape the network)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=0.18215,
)
TINY = {
    **SD_VAE,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "sample_size": 16,
}


def measure(device: torch.device, batch_size: int, latent_size: int, steps: int, quick: bool) -> dict:
    """Decode ``steps`` batches (after two warm-up batches) and time them."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY if quick else SD_VAE)).to(device).eval().requires_grad_(False)
    codec = LatentCodec(vae, [0.0] * 4, [0.18215] * 4, batch_size=batch_size)
    z = torch.randn(batch_size, 4, latent_size, latent_size, device=device)
    for _ in range(2):
        codec.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        images = codec.decode(z)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "device": str(device),
        "precision": codec.precision,
        "batch_size": batch_size,
        "latent_shape": [4, latent_size, latent_size],
        "image_shape": list(images.shape[1:]),
        "steps": steps,
        "ms_per_batch": 1000 * seconds / steps,
        "img_per_s": batch_size * steps / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "vae": "SD-VAE architecture (stabilityai/sd-vae-ft-ema config), random weights" if not quick else "tiny",
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latent-size", type=int, default=32, help="latent side (32: 256 px images)")
    p.add_argument("--steps", type=int, default=10, help="timed batches")
    p.add_argument("--quick", action="store_true", help="a tiny VAE (CPU smoke test)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = measure(torch.device(args.device), args.batch_size, args.latent_size, args.steps, args.quick)
    print(
        f"VAE decode: {result['img_per_s']:.1f} img/s ({result['ms_per_batch']:.1f} ms per batch of "
        f"{args.batch_size}, {result['precision']}, {result['device']}; images {result['image_shape']})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
