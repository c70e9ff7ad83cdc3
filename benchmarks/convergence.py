"""How fast a DiT converges with LightningDiT's and JiT's changes (their Table 1) and with REPA, on the 8x8 digits.

    python -m benchmarks.convergence --json runs/convergence/convergence.json           # every row, 3 seeds
    python -m benchmarks.convergence --rows dit lightning --seeds 0 1 2                 # DiT and --recipe lightning
    python -m benchmarks.convergence --rows none --meanflow lightning                   # MeanFlow with a row's blocks
    python -m benchmarks.convergence --rows lightning repa                              # REPA against its baseline
    python -m benchmarks.convergence --rows none --seeds 0 --repa-weights 0.25 0.5 1 --repa-depths 1 2 3  # a sweep

LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation", Table 1) adds one change at a time to DiT-XL/2 and
reports FID at 80 epochs; rectified flow and logit-normal t are this repo's baseline already, so the rows here
start from them and add, cumulatively: AdamW beta2 0.95, the velocity-direction (cosine) loss, SwiGLU, RMSNorm,
RoPE, and JiT's in-context class tokens (Li & He 2025). Every run is train.main on the digits (hidden 128, depth 4,
4 heads, batch 128, lr 1e-3 after 100 warm-up steps, EMA 0.999), the same for every row but for the row's flags,
with checkpoints every 250 steps; it runs as ``python train.py FLAGS`` in a process of its own (benchmarks import no
script). Each checkpoint in ``--at`` is judged by benchmarks/few_step.py's digits_quality
on its EMA weights: Heun, 10 steps, guidance 1, 2000 class-balanced samples from the same noise; pixel Fréchet
distance to the real digits and a logistic regression's accuracy. Time per step is the median of the run's
logged steps per second (train.py leaves checkpoints out of it), so on a shared machine it is only as steady as
the machine; ``--timing ROUNDS`` also times every row with benchmarks/benchmark.py (train.py's step on the same
network and batch), the rows alternating ROUNDS times, and reports each row's pooled median and fastest step.

A run whose final checkpoint exists is not trained again, and one cut short continues from its last.pt
(``--resume auto``); each run's numbers are cached in its folder (quality.json), so the script can be stopped and
started again. The REPA rows (Yu et al. 2025, "Representation Alignment for Generation") are the lightning row plus
train.py's ``--repa-*`` flags, aligned with benchmarks/digits_encoder.py's frozen digits encoder (16 tokens of 64 on
the DiT's own 4x4 patch grid), made once at OUT/digits-encoder.pt2 (seed 0). Their defaults are REPA's scaled to
4 blocks of width 128: weight 0.5 as REPA's; alignment after block 2 (REPA aligns after block 8 of SiT-XL's 28, and
its depth ablation favours early blocks: 1 or 2 here, and 2 leaves the first half of the network to alignment and
the second to generation); projector width 256, twice the hidden width as REPA's 2048 is about twice SiT-XL's 1152
(its 2048 would dwarf this DiT). ``--repa-weights`` and ``--repa-depths`` add a row for each pair of their values.
``--meanflow ROW`` trains the row's network and optimizer once with the MeanFlow objective
(the digits-meanflow preset: 3000 steps) and judges it at 1 and 2 NFE with its own solver.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.digits_encoder import export_encoder, train_encoder
from benchmarks.few_step import digits_quality
from sampling import Sampler

ROOT = Path(__file__).resolve().parents[1]

# (key, label, flags added to the row before): cumulative, in LightningDiT's order (its last row is train.py's
# --recipe lightning), JiT's in-context tokens last: 4 of them (JiT uses 32 for 256 patches; the 8x8 digits have 16
# patches and 4 registers).
STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("dit", "DiT (rectified flow, logit-normal t, qk-norm, registers)", {}),
    ("beta2", "+ AdamW beta2 0.95", dict(adam_beta2=0.95)),
    ("cosine", "+ velocity-direction (cosine) loss", dict(cosine_loss_weight=1.0)),
    ("swiglu", "+ SwiGLU", dict(mlp="swiglu")),
    ("rmsnorm", "+ RMSNorm", dict(norm="rmsnorm")),
    ("lightning", "+ RoPE (= --recipe lightning)", dict(rope=True)),
    ("jit", "+ in-context class tokens (JiT)", dict(class_tokens=4)),
]
REPA = dict(repa_weight=0.5, repa_depth=2, repa_projector_dim=256)  # the REPA row's flags on the lightning row
BASE = dict(
    dataset="digits",
    image_size=8,
    channels=1,
    flip=False,
    model="DiT-XS/2",
    hidden_size=128,
    depth=4,
    num_heads=4,
    batch_size=128,
    lr=1e-3,
    warmup=100,
    ema_decay=0.999,
    steps=1500,
    fid_every=0,
    sample_every=0,
    ckpt_every=250,
    keep_checkpoints=0,
    log_every=250,
    num_workers=0,
    wandb="disabled",
    recipe="dit",
)


def row_flags(key: str) -> dict[str, Any]:
    """The flags of row key: its own and those of every row before it."""
    flags: dict[str, Any] = {}
    for name, _, added in STEPS:
        flags.update(added)
        if name == key:
            return flags
    raise KeyError(key)


def repa_row(weight: float, depth: int) -> tuple[str, str, dict[str, Any]]:
    """(key, label, flags) of the lightning row with REPA at weight after block depth (the encoder is added per OUT)."""
    flags = {**row_flags("lightning"), **REPA, "repa_weight": weight, "repa_depth": depth}
    key = "repa" if (weight, depth) == (REPA["repa_weight"], REPA["repa_depth"]) else f"repa-w{weight:g}-d{depth}"
    return key, f"lightning + REPA (weight {weight:g}, after block {depth})", flags


def table_rows(repa_grid: list[tuple[float, int]] = ()) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, all its flags) of every row in table order: STEPS' rows, the REPA row, then repa_grid's."""
    rows = [(key, label, row_flags(key)) for key, label, _ in STEPS]
    for weight, depth in [(REPA["repa_weight"], REPA["repa_depth"]), *repa_grid]:
        row = repa_row(weight, depth)
        if row[0] not in [key for key, _, _ in rows]:
            rows.append(row)
    return rows


def encoder_file(out: Path) -> Path:
    """OUT/digits-encoder.pt2, the REPA rows' frozen encoder (benchmarks/digits_encoder.py, seed 0), made if missing."""
    path = out / "digits-encoder.pt2"
    if not path.exists():
        trained = train_encoder(seed=0)
        export_encoder(trained.encoder, path)
        print(f"wrote {path}: held-out accuracy {trained.heldout_accuracy:.3f}, trained in {trained.seconds:.0f} s")
    return path


def train_args(settings: dict[str, Any]) -> list[str]:
    """train.py's command line for settings {field: value} (bools as --name / --no-name)."""
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        args += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return args


def train_and_judge(settings: dict[str, Any], at: list[int], methods: dict[str, list[int]], n: int) -> dict[str, Any]:
    """Train (unless the final checkpoint exists; continuing a run cut short), judge the checkpoints at steps at;
    cached in OUT/quality.json."""
    out = Path(settings["out"])
    cache = out / "quality.json"
    if cache.exists() and (cached := json.loads(cache.read_text()))["at"] == at and cached["n"] == n:
        return cached
    if not (out / "checkpoints" / f"{at[-1]:07d}.pt").exists():
        subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *train_args({**settings, "resume": "auto"})], cwd=ROOT, check=True
        )
    rates = [r["train/steps_per_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    quality = {}
    for step in at:
        sampler = Sampler.from_checkpoint(out / "checkpoints" / f"{step:07d}.pt", device="cpu")
        quality[step] = digits_quality(sampler, methods, n=n)
    result = {"at": at, "n": n, "ms_per_step": 1000 / statistics.median(rates), "quality": quality}
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary(
    results: dict[str, dict[int, dict[str, Any]]],
    at: list[int],
    table: list[tuple[str, str, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Per row of table (default: table_rows()): mean and standard deviation over seeds of FD and accuracy at each
    step, and ms per step."""
    rows = []
    for key, label, flags in table or table_rows():
        if key not in results:
            continue
        runs = list(results[key].values())
        row: dict[str, Any] = {"key": key, "label": label, "seeds": sorted(results[key]), "flags": flags}
        for step in at:
            for metric in ("fd", "accuracy"):
                values = [r["quality"][str(step) if str(step) in r["quality"] else step][0][metric] for r in runs]
                row[f"{metric}@{step}"] = statistics.mean(values)
                row[f"{metric}@{step}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["ms_per_step"] = statistics.mean(r["ms_per_step"] for r in runs)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], at: list[int], timing: dict[str, dict[str, float]] | None = None) -> str:
    """The rows as a markdown table: FD (mean ± std over seeds) at each step, accuracy at the last, time per step
    (the benchmark's median with timing, else the training runs')."""
    if timing:
        rows = [{**r, "ms_per_step": timing[r["key"]]["median_ms"]} for r in rows]
    base = rows[0]["ms_per_step"] if rows else 1.0
    head = ["recipe", "seeds", *[f"FD @ {s}" for s in at], f"accuracy @ {at[-1]}", "ms / step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(len(r["seeds"]))]
        cells += [f"{r[f'fd@{s}']:.3f} ± {r[f'fd@{s}_std']:.3f}" for s in at]
        cells += [f"{r[f'accuracy@{at[-1]}']:.3f}", f"{r['ms_per_step']:.0f} ({r['ms_per_step'] / base:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meanflow_run(key: str, out: Path, n: int) -> dict[str, Any]:
    """Row key's network and optimizer flags with the MeanFlow objective (the digits-meanflow preset: 3000 steps),
    judged at 1 and 2 NFE with the mean solver. The cosine loss is flow matching's: MeanFlow has its own loss."""
    flags = {k: v for k, v in row_flags(key).items() if k != "cosine_loss_weight"}
    settings = dict(
        preset="digits-meanflow",
        sample_every=0,
        ckpt_every=1000,
        keep_checkpoints=0,
        log_every=250,
        wandb="disabled",
        recipe="dit",
        seed=0,
        out=str(out / f"meanflow-{key}"),
        **flags,
    )
    return train_and_judge(settings, [3000], {"mean": [1, 2]}, n)


def time_rows(row_settings: dict[str, dict[str, Any]], rounds: int, steps: int = 20) -> dict[str, dict[str, float]]:
    """ms per training step of each row {key: flags} by benchmarks/benchmark.py, the rows alternating for rounds
    rounds: pooled median and minimum over all timed steps (the minimum is the steadier on a shared machine)."""
    keys = list(row_settings)
    times: dict[str, list[float]] = {k: [] for k in keys}
    net = {
        k: BASE[k]
        for k in (
            "model",
            "hidden_size",
            "depth",
            "num_heads",
            "image_size",
            "channels",
            "batch_size",
            "lr",
            "ema_decay",
            "flip",
            "dataset",
        )
    }
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            flags = {k: v for k, v in row_settings[key].items() if k != "adam_beta2"}  # beta2 costs nothing
            with tempfile.TemporaryDirectory() as tmp:
                args = train_args(
                    {**net, **flags, "steps": steps, "warmup": 3, "sample": False, "json": f"{tmp}/b.json"}
                )
                subprocess.run(
                    [sys.executable, "-m", "benchmarks.benchmark", *args],
                    cwd=ROOT,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                times[key] += json.loads(Path(f"{tmp}/b.json").read_text())["train"][0]["step_ms_all"]
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=__doc__.split("\n\n")[0])
    keys = [k for k, _, _ in STEPS]
    p.add_argument(
        "--rows", nargs="+", default=[*keys, "repa"], choices=[*keys, "repa", "none"], help="rows to run (none: no row)"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of every row")
    p.add_argument("--at", nargs="+", type=int, default=[250, 500, 1000, 1500], help="steps judged (the last: the run)")
    p.add_argument("--n", type=int, default=2000, help="samples per judgement")
    p.add_argument("--out", default="runs/convergence", help="folder of the runs (OUT/ROW/seedS)")
    p.add_argument("--repa-weights", nargs="+", type=float, help="REPA rows at these weights (default: 0.5)")
    p.add_argument("--repa-depths", nargs="+", type=int, help="REPA rows aligned after these blocks (default: 2)")
    p.add_argument("--meanflow", choices=keys, help="also train this row's blocks with MeanFlow, 3000 steps")
    p.add_argument(
        "--cached",
        action="store_true",
        help="train nothing: the table of the runs already judged in OUT (each row with the seeds it has)",
    )
    p.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time each row's step this many rounds with benchmarks/benchmark.py (0: no)",
    )
    p.add_argument("--json", help="write the per-seed numbers and the table here")
    args = p.parse_args(argv)
    out, at = Path(args.out), sorted(args.at)
    weights, depths = args.repa_weights or [REPA["repa_weight"]], args.repa_depths or [REPA["repa_depth"]]
    grid = list(itertools.product(weights, depths)) if args.repa_weights or args.repa_depths else []
    if any(d < 1 or d > BASE["depth"] for _, d in grid):
        p.error(f"--repa-depths must lie in 1..{BASE['depth']} (the DiT's blocks); got {args.repa_depths}")
    table, swept = table_rows(grid), {repa_row(weight, depth)[0] for weight, depth in grid}
    chosen = [row for row in table if row[0] in args.rows or row[0] in swept]  # in table order
    results: dict[str, dict[int, dict[str, Any]]] = {}
    run_flags: dict[str, dict[str, Any]] = {}
    for key, _, flags in chosen:
        seeds = (
            sorted(int(d.parent.name[4:]) for d in (out / key).glob("seed*/quality.json"))
            if args.cached
            else args.seeds
        )
        if "repa_weight" in flags and seeds:
            flags = {**flags, "repa_encoder": str(encoder_file(out))}
        run_flags[key] = flags
        for seed in seeds:
            settings = {**BASE, "steps": at[-1], **flags, "seed": seed, "out": str(out / key / f"seed{seed}")}
            results.setdefault(key, {})[seed] = train_and_judge(settings, at, {"heun": [10]}, args.n)
    rows = summary(results, at, table)
    report: dict[str, Any] = {"base": BASE, "at": at, "n": args.n, "rows": rows, "runs": results}
    if args.timing:
        report["timing"] = time_rows({r["key"]: run_flags[r["key"]] for r in rows}, args.timing)
        base = next(iter(report["timing"].values()))
        for key, t in report["timing"].items():
            print(
                f"{key:>10s}: median {t['median_ms']:.0f} ms ({t['median_ms'] / base['median_ms']:.2f}x), "
                f"fastest {t['min_ms']:.0f} ms ({t['min_ms'] / base['min_ms']:.2f}x)"
            )
    if rows:
        report["table"] = markdown(rows, at, report.get("timing"))
        print(report["table"])
    if args.meanflow:
        report["meanflow"] = meanflow_run(args.meanflow, out, args.n)
        for r in report["meanflow"]["quality"][max(report["meanflow"]["quality"])]:
            print(
                f"MeanFlow with {args.meanflow}: {r['method']} {r['nfe']} NFE  FD {r['fd']:.3f}  accuracy {r['accuracy']:.3f}"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    cli()
