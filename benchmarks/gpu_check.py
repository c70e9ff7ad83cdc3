"""The GPU check: proves every GPU path of the repository and measures it, within 8 minutes of wall time on one
H100, so that a short GPU loan goes to measuring, not to setting up.

    python -m benchmarks.gpu_check prepare      # on a machine with PyPI: download the wheels the GPU image lacks
                                                # into .whl/ (git-ignored) and print the command for the GPU machine
    python3 -m benchmarks.gpu_check run         # on the GPU machine: install the carried wheels (only of packages
                                                # Python cannot find) into a temporary folder, then run every part
    python -m benchmarks.gpu_check run --quick  # tiny sizes, CPU only (the default where CUDA is missing)

`run` prints the GPU, the driver and the torch build, then runs these parts, each a subprocess under its own
timeout (the smaller of its cap and what is left of the budget), so that one hang cannot eat the rest:
  1. tests      pytest -m gpu tests/test_gpu.py: bf16 against fp32, flash attention, guidance, the sampler's
                precision, the on-device data path, fused AdamW without host syncs, NCCL
  2. train      train.py on the digits with bf16 and torch.compile; resume from its checkpoint; sampler.py
  3. bench_*    python -m benchmarks.benchmark: DiT-S/2 and DiT-B/2 at 32x32, batch 256, bf16, compiled and eager
                (img/s, MFU, peak memory, host syncs per step); sampling at 1, 10 and 50 NFE, with and without
                guidance
  4. latent     DiT-XL/2 training on synthetic latents of ImageNet 256's shape (4x32x32, 1000 classes), and the
                VAE's decode throughput (SD-VAE's architecture, random weights: benchmarks/vae_decode.py)
  5. meanflow   the MeanFlow objective's training img/s next to flow's
Without CUDA (or with --quick) every part runs at tiny size on the CPU and each CUDA-only row says it was skipped.

Output, in --out (a new temporary folder by default): gpu_check.log (everything printed), summary.json
(environment, per part its status, exit code, duration and limit, the test outcomes with the numbers they recorded,
the training run's losses, every benchmark result) and digits_samples.png. The key numbers are printed last. Exit
status: 0 when no part failed or timed out (skipped parts are fine), else 1.

Every flag defaults to an environment variable: --out OUT; --python PYTHON (default this interpreter, or the
repository's .venv when this one has no torch); --quick GPU_CHECK_QUICK=1; --budget-s GPU_CHECK_BUDGET_S (default
450); --parts GPU_CHECK_PARTS (comma list of tests,train,bench,latent,meanflow: to rerun one part); --work GPU_CHECK_WORK
(checkpoints and raw results, default a new temporary folder); --wheels GPU_CHECK_WHEELS (default .whl).

This file is the command line, the wheels and the plan of parts; benchmarks/gpu_runner.py runs the parts under
their timeouts and benchmarks/gpu_summary.py builds summary.json and the report from what they leave.

Standard library only at the top (this file and the two it imports): `prepare` runs where the project's packages
are not installed yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_runner import ROOT, Log, Part, Runner, run_command
from benchmarks.gpu_summary import report, summarize, write_summary

# Packages the GPU image may lack: (distribution, version, import name, why). torchcfm and POT are not in the
# image; the others are (device notes, package list of 2026-11), and are carried in case they are not: `run`
# installs a wheel only when Python cannot find its package. Not needed: wandb (--wandb disabled), moviepy (no
# GIFs: --sample-every 0, no --gif) and torch-fidelity (FID is not run here). Versions: Python 3.12, numpy 2.
PACKAGES = [
    ("torchcfm", "1.0.7", "torchcfm", "objectives/flow.py imports it"),
    ("POT", "0.9.6.post1", "ot", "torchcfm imports it (0.9.7 wheels are 33 MB, 0.9.6 1.5 MB)"),
    ("scikit-learn", "1.7.2", "sklearn", "the digits set (fallback)"),
    ("joblib", "1.5.2", "joblib", "scikit-learn (fallback)"),
    ("threadpoolctl", "3.6.0", "threadpoolctl", "scikit-learn (fallback)"),
    ("pytest", "9.2.0", "pytest", "the GPU tests (fallback)"),
    ("pluggy", "1.7.0", "pluggy", "pytest (fallback)"),
    ("iniconfig", "2.3.1", "iniconfig", "pytest (fallback)"),
    ("pygments", "2.21.0", "pygments", "pytest (fallback)"),
    ("packaging", "26.4", "packaging", "pytest (fallback)"),
    ("tqdm", "4.70.1", "tqdm", "train.py (fallback)"),
    ("diffusers", "0.42.1", "diffusers", "the VAE decode row (models/vae.py); the image has safetensors and hub"),
    ("regex", "2026.11.19", "regex", "diffusers imports it"),
    ("importlib_metadata", "10.2.0", "importlib_metadata", "diffusers imports it (fallback)"),
    ("zipp", "4.1.2", "zipp", "importlib_metadata (fallback)"),
]
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
)
GROUPS = ("tests", "train", "bench", "latent", "meanflow")
BUDGET_S = 450


# ------------------------------------------------------------------------------------------------ the parts


def plan(py: str, work: Path, out: Path, quick: bool) -> list[Part]:
    """Every part of `run`, in order: quick runs everything at tiny size on the CPU."""
    run, ckpt = work / "digits", work / "digits" / "checkpoints" / "last.pt"
    # 1. the GPU test subset; on CPU every test is collected and skipped (the summary says so)
    pytest = "-m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider -o junit_family=legacy".split()
    parts = [Part("tests", "tests", 90, (py, *pytest, f"--junitxml={work / 'pytest.xml'}"))]

    # 2. train.py on the digits, a resume from its checkpoint, then sampler.py on the last checkpoint
    if quick:
        common = "--steps 20 --ckpt-every 10 --log-every 5 --batch-size 32 --device cpu --precision fp32 --no-compile"
        more, sample = "--steps 30", "--n 1 --steps 2 --method euler --device cpu"
    else:
        common = "--steps 300 --ckpt-every 150 --log-every 50 --device cuda --precision bf16 --compile"
        more, sample = "--steps 500", "--n 10 --steps 20 --method heun --device cuda"
    train = (
        py,
        "train.py",
        "--preset",
        "digits-quick",
        "--out",
        str(run),
        "--sample-every",
        "0",
        "--fid-every",
        "0",
        "--wandb",
        "disabled",
        *common.split(),
    )
    parts += [
        Part("train", "train", 120, train),
        Part(
            "resume",
            "train",
            60,
            (*train, *more.split(), "--resume"),
            needs=lambda done: (
                "" if done.get("train", {}).get("status") == "ok" else "the first training run failed or did not run"
            ),
        ),
        Part(
            "sample",
            "train",
            45,
            (
                py,
                "sampler.py",
                "--ckpt",
                str(ckpt),
                "--each-class",
                "--cfg-scale",
                "2.5",
                "--seed",
                "0",
                *sample.split(),
                "--out",
                str(out / "digits_samples.png"),
                "--npz",
                str(work / "digits_samples.npz"),
                "--overwrite",
            ),
            needs=lambda done: "" if ckpt.is_file() else "no checkpoint to sample from",
        ),
    ]

    # 3. training and sampling throughput, one JSON each in work; 4. MeanFlow next to flow's bench_s2_compiled
    def bench(name: str, group: str, cap_s: int, flags: str) -> Part:
        argv = (py, "-m", "benchmarks.benchmark", *flags.split(), "--json", str(work / f"bench_{name}.json"))
        return Part(f"bench_{name}", group, cap_s, argv)

    def vae_decode(flags: str) -> Part:  # SD-VAE's architecture, random weights (nothing to download)
        return Part(
            "vae_decode",
            "latent",
            60,
            (py, "-m", "benchmarks.vae_decode", *flags.split(), "--json", str(work / "vae_decode.json")),
        )

    if quick:  # one tiny row, and each CUDA row is listed as skipped
        tiny = (
            "--device cpu --model DiT-XS/2 --image-size 8 --batch-size 4 --steps 2 --warmup 1 --num-images 16 "
            "--peak-seconds 0.05 --threads 1 --no-compile"
        )
        parts.append(bench("tiny", "bench", 90, f"{tiny} --sample-steps 1 --sample-n 2"))
        why = "needs CUDA (quick CPU mode runs the tiny eager row instead)"
        parts += [
            Part(f"bench_{row}", "bench", skip=why)
            for row in ("s2_compiled", "s2_eager", "sample_nfe50", "b2_compiled", "b2_eager")
        ]
        parts.append(bench("latent", "latent", 90, f"{tiny} --channels 4 --num-classes 1000 --no-sample"))
        parts.append(vae_decode("--quick --device cpu --latent-size 4 --batch-size 2 --steps 1"))
        parts.append(bench("meanflow", "meanflow", 90, f"--objective meanflow {tiny} --no-sample"))
        return parts
    gpu = "--device cuda --batch-size 256 --steps 50 --warmup 10 --precision bf16"
    sampling = f"{gpu} --sample-method euler --cfg-scale 4.0"
    return parts + [  # most wanted first: if time runs short, the rows at the end are the ones skipped
        bench("s2_compiled", "bench", 120, f"--model DiT-S/2 --compile --sample-steps 10 {sampling}"),
        # DiT-XL/2 on synthetic latents of ImageNet 256's shape (4 x 32 x 32, 1000 classes); fast-DiT's batch 128
        bench(
            "xl2_latent",
            "latent",
            120,
            "--model DiT-XL/2 --image-size 32 --channels 4 --num-classes 1000 "
            "--compile --no-sample --device cuda --batch-size 128 --steps 20 --warmup 5 --precision bf16",
        ),
        vae_decode("--device cuda --batch-size 32 --steps 10"),
        bench("s2_eager", "bench", 60, f"--model DiT-S/2 --no-compile --sample-steps 1 {sampling}"),
        bench("sample_nfe50", "bench", 60, f"--model DiT-S/2 --no-train --sample-steps 50 {sampling}"),
        bench("b2_compiled", "bench", 120, f"--model DiT-B/2 --compile --no-sample {sampling}"),
        bench("b2_eager", "bench", 60, f"--model DiT-B/2 --no-compile --no-sample {sampling}"),
        bench("meanflow", "meanflow", 120, f"--objective meanflow --model DiT-S/2 --compile --no-sample {gpu}"),
    ]


# ------------------------------------------------------------------------------------------------ machine, wheels


def probe(work: str, modules: list[str]) -> None:
    """Run by the parts' Python: records the machine (GPU, driver, torch, CUDA, cuDNN, NCCL) in work/env.json, with
    the carried packages that this Python cannot find; exits non-zero when torch does not import."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]  # found without importing: fast
    env = {"python": platform.python_version(), "machine": platform.machine(), "missing_packages": missing}
    try:
        import torch
    except ImportError as e:
        Path(work, "env.json").write_text(json.dumps({**env, "torch": None, "cuda_available": False, "error": str(e)}))
        sys.exit(f"torch does not import: {e}")
    env.update(
        torch=torch.__version__,
        cuda_available=torch.cuda.is_available(),
        cuda=torch.version.cuda,
        cpu_threads=torch.get_num_threads(),
    )
    if env["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
        try:
            nccl = torch.cuda.nccl.version()  # a tuple, or an int in older torch
            env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
        except Exception as e:
            env["nccl"] = f"unavailable ({type(e).__name__})"
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    Path(work, "env.json").write_text(json.dumps(env, indent=1))
    print("machine:", ", ".join(f"{k} {v}" for k, v in env.items()))


def norm(name: str) -> str:
    """A distribution name as wheel file names spell it."""
    return name.lower().replace("-", "_").replace(".", "_")


def wheel_key(filename: str) -> str:
    """NAME-VERSION-...whl -> name-version, the name normalised."""
    name, version = Path(filename).name.split("-")[:2]
    return f"{norm(name)}-{version}"


def carried_wheel(wheels: Path, dist: str, version: str) -> Path | None:
    return next((w for w in sorted(wheels.glob("*.whl")) if wheel_key(w.name) == f"{norm(dist)}-{version}"), None)


def install_wheels(wheels: Path, missing: list[str], py: str, log: Log) -> tuple[Path | None, list[str], bool]:
    """Installs the carried wheels of the missing packages into a new temporary folder, to go first on PYTHONPATH.
    Nothing is installed when the folder is missing or nothing is. Returns (folder or None, wheel names, ok): not
    ok when a missing package has no wheel here or pip fails."""
    if not wheels.is_dir():
        log.say(f"no {wheels}/ folder: installing nothing")
        return None, [], True
    if not missing:
        log.say("every carried package imports already: installing nothing")
        return None, [], True
    found, ok = [], True
    for dist, version, module, _ in PACKAGES:
        if module in missing:
            wheel = carried_wheel(wheels, dist, version)
            if wheel is None:
                log.say(f"error: {module} is missing and {wheels}/ has no {dist} {version} wheel (run prepare)")
                ok = False
            else:
                found.append(wheel)
    if not found:
        return None, [], False
    site = Path(tempfile.mkdtemp(prefix="gpu_check_site."))
    names = [w.name for w in found]
    log.say(f"installing into {site}: {' '.join(names)}")
    pip = "-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target".split()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    status, _ = run_command([py, *pip, str(site), *map(str, found)], 120, log.write, env)
    if status != "ok":
        log.say("pip install failed")
        return None, [], False
    return site, names, ok


def pick_python(explicit: str | None) -> str:
    """--python, else this interpreter, else the repository's .venv when this one has no torch."""
    if explicit:
        return explicit
    venv = ROOT / ".venv" / "bin" / "python"
    if importlib.util.find_spec("torch") is None and venv.exists():
        return str(venv)
    return sys.executable


# ------------------------------------------------------------------------------------------------ commands


def child_env(quick: bool, site: Path | None = None) -> dict[str, str]:
    """The parts' environment: unbuffered, wandb off, POT without its unused backends; on the CPU no CUDA device,
    one thread (tiny models: fastest) and OpenMP threads that sleep instead of spinning when idle."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    for backend in ("JAX", "CUPY", "TENSORFLOW"):  # POT (imported by torchcfm) would import them
        env.setdefault(f"POT_BACKEND_DISABLE_{backend}", "1")
    if site:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if quick:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_WAIT_POLICY="PASSIVE")
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(args: argparse.Namespace) -> int:
    py = pick_python(args.python)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_out.")).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_work.")).resolve()
    groups = [g.strip() for g in args.parts.split(",") if g.strip()]
    if unknown := set(groups) - set(GROUPS):
        print(
            f"gpu_check run: unknown part {', '.join(sorted(unknown))} (choose from {','.join(GROUPS)})",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    quick, installed = args.quick, []
    runner = Runner(log, work, args.budget_s)
    try:
        log.say(f"gpu_check run in {ROOT}; OUT={out}; work folder {work}; budget {args.budget_s}s")
        try:
            query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
            smi = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=30)
            log.write(smi.stdout + smi.stderr)
        except (OSError, subprocess.SubprocessError):
            log.say("no nvidia-smi on this machine")
        modules = [module for _, _, module, _ in PACKAGES]
        code = "import sys; from benchmarks.gpu_check import probe; probe(sys.argv[1], sys.argv[2:])"
        env = {**child_env(quick=False), "OMP_WAIT_POLICY": "PASSIVE"}
        status, _ = run_command([py, "-c", code, str(work), *modules], 120, log.write, env)
        machine = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
        if status != "ok":
            runner.record("machine", "failed", 1, 0, None, f"{py} could not import torch")
        else:
            site, installed, ok = install_wheels(Path(args.wheels), machine.get("missing_packages", []), py, log)
            if not ok:
                runner.record("install", "failed", 1, 0, None, "missing packages were not installed (see above)")
            if site:
                sys.path.insert(0, str(site))  # for the summary's digits classifier
            if not machine.get("cuda_available") and not quick:
                log.say("no CUDA device: quick CPU mode (tiny sizes; CUDA-only parts are reported as skipped)")
                quick = True
            runner.env = child_env(quick, site)
            runner.run([p for p in plan(py, work, out, quick) if p.group in groups])
        summary = summarize(
            work, runner.records, quick=quick, budget_s=args.budget_s, seconds=log.elapsed(), installed=installed
        )
        write_summary(summary, out)
        log.write(report(summary, out))
        return 0 if summary["ok"] else 1
    finally:
        log.close()


def prepare(args: argparse.Namespace) -> int:
    wheels = Path(args.wheels).resolve()
    wheels.mkdir(parents=True, exist_ok=True)
    log = Log()
    specs = [f"{dist}=={version}" for dist, version, _, _ in PACKAGES]
    log.say(f"downloading {len(specs)} wheels for CPython 3.12 x86-64 into {wheels}/")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    flags = "-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp".split()
    if subprocess.run([args.python or sys.executable, *flags, *platforms, "-d", str(wheels), *specs]).returncode:
        log.say("pip download failed")
        return 1
    wanted = {f"{norm(dist)}-{version}" for dist, version, _, _ in PACKAGES}
    for wheel in sorted(wheels.glob("*.whl")):  # one version of each: another would stop the install there
        if wheel_key(wheel.name) not in wanted:
            log.say(f"removing stale {wheel}")
            wheel.unlink()
    sizes = {w.name: w.stat().st_size for w in sorted(wheels.glob("*.whl"))}
    log.write("".join(f"{size / 2**20:7.2f} MiB  {name}\n" for name, size in sizes.items()))
    log.say(f"total: {sum(sizes.values()) / 2**20:.1f} MiB in {len(sizes)} wheels")
    if subprocess.run(["git", "check-ignore", "-q", f"{wheels}/"], cwd=ROOT, stderr=subprocess.DEVNULL).returncode:
        log.say(f"warning: {wheels}/ is not git-ignored: add it to .gitignore (or .git/info/exclude)")
    command = "python3 -m benchmarks.gpu_check run" + ("" if args.wheels == ".whl" else f" --wheels {args.wheels}")
    log.write(f"""
On the GPU machine, from the repository root (the working tree plus the ignored folder {args.wheels}/, named in carry):

    {command}

device tool: run(command="{command}", carry=["{args.wheels}"], timeout_s=540)
It needs nothing else: no network, no ../shared; it writes gpu_check.log, summary.json and
digits_samples.png to $OUT and ends within {args.budget_s}s (--budget-s).
""")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        epilog="Details: the docstring of benchmarks/gpu_check.py.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("prepare", "download the wheels the GPU image lacks (needs PyPI)"),
        ("run", "run every part and write summary.json"),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--wheels", default=env("GPU_CHECK_WHEELS", ".whl"), help="wheel folder (GPU_CHECK_WHEELS, .whl)"
        )
        sub.add_argument("--python", default=env("PYTHON"), help="the interpreter of the parts, or of pip (PYTHON)")
        sub.add_argument(
            "--budget-s",
            type=int,
            default=int(env("GPU_CHECK_BUDGET_S", BUDGET_S)),
            help=f"wall-time budget of run (GPU_CHECK_BUDGET_S; default {BUDGET_S})",
        )
        if name == "run":
            sub.add_argument(
                "--quick",
                action="store_true",
                default=env("GPU_CHECK_QUICK", "0") == "1",
                help="tiny sizes on the CPU, the default without CUDA (GPU_CHECK_QUICK=1)",
            )
            sub.add_argument("--out", default=env("OUT"), help="summary.json, gpu_check.log and samples go here (OUT)")
            sub.add_argument("--work", default=env("GPU_CHECK_WORK"), help="checkpoints, raw results (GPU_CHECK_WORK)")
            sub.add_argument(
                "--parts",
                default=env("GPU_CHECK_PARTS", ",".join(GROUPS)),
                help=f"comma list of {','.join(GROUPS)} (GPU_CHECK_PARTS; default all)",
            )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
