#!/usr/bin/env bash
# gpu_check.sh: one script that proves every GPU path of the repository and measures it, within 8 minutes of
# wall time on one H100, so that a short GPU loan goes to measuring, not to setting up.
#
# Usage (from anywhere; the script works in the repository root):
#
#   bash benchmarks/gpu_check.sh prepare   # on a machine with PyPI: download the wheels the GPU image lacks into
#                                          # .whl/ (git-ignored) and print the command for the GPU machine
#   bash benchmarks/gpu_check.sh run       # on the GPU machine: install the carried wheels (only of packages
#                                          # Python cannot find) into a temporary folder, then run every part
#   bash benchmarks/gpu_check.sh run --quick   # tiny sizes, CPU only (the default where CUDA is missing)
#
# `run` prints the GPU, the driver and the torch build, then runs these parts, each under its own timeout (the
# smaller of its cap and what is left of the budget), so that one hang cannot eat the rest:
#   1. tests      pytest -m gpu tests/test_gpu.py: bf16 against fp32, flash attention, guidance, the sampler's
#                 precision, the on-device data path, fused AdamW without host syncs, NCCL
#   2. train      train.py on the digits with bf16 and torch.compile; resume from its checkpoint; sampler.py
#   3. bench_*    python -m benchmarks.benchmark: DiT-S/2 and DiT-B/2 at 32x32, batch 256, bf16, compiled and
#                 eager (img/s, MFU, peak memory, host syncs per step); sampling at 1, 10 and 50 NFE, with and
#                 without guidance
#   4. meanflow   the MeanFlow objective's training img/s next to flow's, once the benchmark has
#                 --objective meanflow
# Without CUDA (or with --quick) every part runs at tiny size on the CPU and each CUDA-only row says it was
# skipped: tests/test_gpu_check.py runs it that way in the normal suite, so this script cannot rot between loans.
#
# Output, in $OUT (a new temporary folder when OUT is unset): gpu_check.log (everything printed),
# summary.json (environment, per part its status, exit code, duration and limit, the test outcomes with the
# numbers they recorded, the training run's losses, every benchmark result) and digits_samples.png. The key
# numbers are printed last. Exit status: 0 when no part failed or timed out (skipped parts are fine), else 1.
#
# Environment: OUT; PYTHON (default python3, or the repository's .venv when python3 has no torch);
# GPU_CHECK_QUICK=1 (same as --quick); GPU_CHECK_BUDGET_S (wall-time budget of `run`, default 450);
# GPU_CHECK_PARTS (comma list of tests,train,bench,meanflow; default all of them: to rerun one part);
# GPU_CHECK_WORK (folder for checkpoints and raw results, default a new temporary folder);
# GPU_CHECK_WHEELS (the wheel folder, default .whl).

set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
WHEELS=${GPU_CHECK_WHEELS:-.whl}

# Packages the GPU image may lack: "distribution version import-name why". torchcfm and POT are not in the
# image; the others are (device notes, package list of 2026-11), and are carried in case they are not: `run`
# installs a wheel only when Python cannot find its package. Not needed: wandb (--wandb disabled), moviepy (no
# GIFs: --sample-every 0, no --gif) and torch-fidelity (FID is not run here). Versions: Python 3.12, numpy 2.
PACKAGES="\
torchcfm      1.0.7        torchcfm      objectives/flow.py imports it
POT           0.9.6.post1  ot            torchcfm imports it (0.9.7 wheels are 33 MB, 0.9.6 1.5 MB)
scikit-learn  1.7.2        sklearn       the digits set (fallback)
joblib        1.5.2        joblib        scikit-learn (fallback)
threadpoolctl 3.6.0        threadpoolctl scikit-learn (fallback)
pytest        9.2.0        pytest        the GPU tests (fallback)
pluggy        1.7.0        pluggy        pytest (fallback)
iniconfig     2.3.1        iniconfig     pytest (fallback)
pygments      2.21.0       pygments      pytest (fallback)
packaging     26.4         packaging     pytest (fallback)
tqdm          4.70.1       tqdm          train.py (fallback)"

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

# ------------------------------------------------------------------------------------------------ helpers

T0_US=${EPOCHREALTIME//[!0-9]/}

now_us() { echo "${EPOCHREALTIME//[!0-9]/}"; }

elapsed_s() { echo $(( ($(now_us) - T0_US) / 1000000 )); }

say() { printf '[gpu_check %4ss] %s\n' "$(elapsed_s)" "$*"; }

# record PART STATUS RC MILLISECONDS LIMIT NOTE: one line of $WORK/parts.tsv for the summary
record() {
    local note=${6//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${note//$'\n'/ }" >>"$WORK/parts.tsv"
}

skip() {  # skip PART REASON
    say "skip $1: $2"
    record "$1" skipped - 0 - "$2"
}

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

# step NAME CAP CMD...: run CMD with a timeout of the smaller of CAP seconds and what is left of the budget; its
# output goes to the log and to $WORK/NAME.log. Records status (ok, failed, timeout), exit code and duration.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - $(elapsed_s) - RESERVE ))
    if (( left < MIN_STEP )); then
        skip "$name" "out of time: ${left}s of the ${BUDGET}s budget left"
        return 3
    fi
    local limit=$(( cap < left ? cap : left )) t
    say "start $name (limit ${limit}s): $*"
    t=$(now_us)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
    local rc=${PIPESTATUS[0]}
    local ms=$(( ($(now_us) - t) / 1000 )) status=failed
    (( rc == 0 )) && status=ok
    (( rc == 124 || rc == 137 )) && status=timeout
    say "end $name: $status (exit $rc) after $(( ms / 1000 ))s"
    record "$name" "$status" "$rc" "$ms" "$limit" ""
    return "$rc"
}

pick_python() {  # PYTHON, else python3, else the repository's .venv when python3 has no torch
    if [[ -n ${PYTHON:-} ]]; then
        PY=$PYTHON
    elif ! python3 -c 'import torch' 2>/dev/null && [[ -x .venv/bin/python ]]; then
        PY=$ROOT/.venv/bin/python
    else
        PY=python3
    fi
}

# ------------------------------------------------------------------------------------------------ prepare

prepare() {
    pick_python
    mkdir -p "$WHEELS"
    local specs=() platform_args=() dist version p _
    while read -r dist version _; do
        specs+=("$dist==$version")
    done <<<"$PACKAGES"
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    say "downloading ${#specs[@]} wheels for CPython 3.12 x86-64 into $WHEELS/"
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" --platform any -d "$WHEELS" "${specs[@]}" || { say "pip download failed"; return 1; }
    # One version of each package: a stale wheel of another version would stop the install on the GPU machine.
    local wheel keep
    for wheel in "$WHEELS"/*.whl; do
        keep=no
        while read -r dist version _; do
            [[ $(wheel_key "$(basename "$wheel")") == "$(norm "$dist")-$version" ]] && keep=yes
        done <<<"$PACKAGES"
        [[ $keep == yes ]] || { say "removing stale $wheel"; rm -f "$wheel"; }
    done
    du -h "$WHEELS"/*.whl
    say "total: $(du -ch "$WHEELS"/*.whl | tail -1 | cut -f1) in $(find "$WHEELS" -name '*.whl' | wc -l) wheels"
    if ! git check-ignore -q "$WHEELS/" 2>/dev/null; then
        say "warning: $WHEELS/ is not git-ignored: add the line '/${WHEELS#./}/' to .gitignore (or .git/info/exclude)"
    fi
    local command="bash benchmarks/gpu_check.sh run"
    [[ $WHEELS == .whl ]] || command="GPU_CHECK_WHEELS=$WHEELS $command"
    cat <<EOF

On the GPU machine, from the repository root (the working tree plus the ignored folder $WHEELS/, named in carry):

    $command

device tool: run(command="$command", carry=["$WHEELS"], timeout_s=540)
It needs nothing else: no network, no ../shared; it writes gpu_check.log, summary.json and
digits_samples.png to \$OUT and ends within ${GPU_CHECK_BUDGET_S:-450}s (GPU_CHECK_BUDGET_S).
EOF
}

norm() { local s=${1,,}; echo "${s//[-.]/_}"; }  # a distribution name as wheel file names spell it

wheel_key() {  # NAME-VERSION-...whl -> name-version (name normalised)
    local base=${1%.whl} name version
    name=${base%%-*}
    version=${base#*-}
    version=${version%%-*}
    echo "$(norm "$name")-$version"
}

# ------------------------------------------------------------------------------------------------ run

# Prints and records the machine (GPU, driver, torch, CUDA, cuDNN, NCCL) in $WORK/env.json, and lists in
# $WORK/missing.txt the carried packages that this Python cannot find. Sets CUDA=1 when torch sees a GPU.
probe() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    else
        say "no nvidia-smi on this machine"
    fi
    local modules module _
    modules=$(while read -r _ _ module _; do echo "$module"; done <<<"$PACKAGES")
    # shellcheck disable=SC2086  # one module name per argument
    "$PY" - "$WORK" $modules <<'EOF' || return 1
import importlib.util, json, platform, subprocess, sys

work, modules = sys.argv[1], sys.argv[2:]
missing = [m for m in modules if importlib.util.find_spec(m) is None]  # found without importing: fast
open(f"{work}/missing.txt", "w").write("".join(f"{m}\n" for m in missing))
env = {"python": platform.python_version(), "machine": platform.machine(), "missing_packages": missing}
try:
    import torch
except ImportError as e:
    json.dump({**env, "torch": None, "cuda_available": False, "error": str(e)}, open(f"{work}/env.json", "w"))
    sys.exit(f"torch does not import: {e}")
env.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
           cpu_threads=torch.get_num_threads())
if env["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
               multiprocessors=p.multi_processor_count, cudnn=torch.backends.cudnn.version())
    try:
        nccl = torch.cuda.nccl.version()  # a tuple, or an int in older torch
        env["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl
    except Exception as e:
        env["nccl"] = f"unavailable ({type(e).__name__})"
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
json.dump(env, open(f"{work}/env.json", "w"), indent=1)
print("machine:", ", ".join(f"{k} {v}" for k, v in env.items()))
EOF
    CUDA=$(grep -c '"cuda_available": true' "$WORK/env.json" || true)
}

# Installs the carried wheels of the packages that probe found missing into a temporary folder put first on
# PYTHONPATH. Nothing is installed when the folder is missing or nothing is (the CPU machine's venv has all).
# Fails when a missing package has no wheel here.
install_wheels() {
    if [[ ! -d $WHEELS ]]; then
        say "no $WHEELS/ folder: installing nothing"
        return 0
    fi
    local missing dist version module wheel found _ wheels=() unmet=0
    missing=$(<"$WORK/missing.txt")
    if [[ -z $missing ]]; then
        say "every carried package imports already: installing nothing"
        return 0
    fi
    while read -r dist version module _; do
        [[ $'\n'$missing$'\n' == *$'\n'$module$'\n'* ]] || continue
        found=""
        for wheel in "$WHEELS"/*.whl; do
            [[ $(wheel_key "$(basename "$wheel")") == "$(norm "$dist")-$version" ]] && found=$wheel
        done
        if [[ -z $found ]]; then
            say "error: $module is missing and $WHEELS/ has no $dist $version wheel (run prepare)"
            unmet=1
        else
            wheels+=("$found")
        fi
    done <<<"$PACKAGES"
    (( ${#wheels[@]} )) || return 1
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")
    say "installing into $SITE: ${wheels[*]##*/}"
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || { say "pip install failed"; return 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    INSTALLED="${wheels[*]##*/}"
    return "$unmet"
}

# 1. the GPU test subset; on CPU every test is collected and skipped (the summary says so)
part_tests() {
    step tests 90 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider \
        -o junit_family=legacy --junitxml="$WORK/pytest.xml"
}

# 2. train.py on the digits, a resume from its checkpoint, then sampler.py on the last checkpoint
part_train() {
    local run=$WORK/digits common=() more=() sample=()
    if (( QUICK )); then
        common=(--steps 20 --ckpt-every 10 --log-every 5 --batch-size 32 --device cpu --precision fp32 --no-compile)
        more=(--steps 30)
        sample=(--n 1 --steps 2 --method euler --device cpu)
    else
        common=(--steps 300 --ckpt-every 150 --log-every 50 --device cuda --precision bf16 --compile)
        more=(--steps 500)
        sample=(--n 10 --steps 20 --method heun --device cuda)
    fi
    local args=(train.py --preset digits-quick --out "$run" --sample-every 0 --fid-every 0 --wandb disabled)
    if step train 120 "$PY" "${args[@]}" "${common[@]}"; then
        step resume 60 "$PY" "${args[@]}" "${common[@]}" "${more[@]}" --resume
    else
        skip resume "the first training run failed or did not run"
    fi
    if [[ -f $run/checkpoints/last.pt ]]; then
        step sample 45 "$PY" sampler.py --ckpt "$run/checkpoints/last.pt" --each-class --cfg-scale 2.5 --seed 0 \
            "${sample[@]}" --out "$OUT/digits_samples.png" --npz "$WORK/digits_samples.npz" --overwrite
    else
        skip sample "no checkpoint to sample from"
    fi
}

# bench NAME CAP FLAGS...: one benchmark run, its JSON in $WORK/bench_NAME.json
bench() {
    local name=$1 cap=$2
    shift 2
    step "bench_$name" "$cap" "$PY" -m benchmarks.benchmark "$@" --json "$WORK/bench_$name.json"
}

# 3. training and sampling throughput; on CPU one tiny row, and each CUDA row is listed as skipped
part_bench() {
    local gpu=(--device cuda --batch-size 256 --steps 50 --warmup 10 --precision bf16 --sample-method euler
        --cfg-scale 4.0)
    if (( QUICK )); then
        bench tiny 90 --device cpu --model DiT-XS/2 --image-size 8 --batch-size 4 --steps 2 --warmup 1 \
            --num-images 16 --sample-steps 1 --sample-n 2 --peak-seconds 0.05 --threads 1 --no-compile
        local row
        for row in s2_compiled s2_eager sample_nfe50 b2_compiled b2_eager; do
            skip "bench_$row" "needs CUDA (quick CPU mode runs the tiny eager row instead)"
        done
        return
    fi
    # most wanted first: if time runs short, the rows at the end are the ones skipped
    bench s2_compiled 120 --model DiT-S/2 --compile --sample-steps 10 "${gpu[@]}"
    bench s2_eager 60 --model DiT-S/2 --no-compile --sample-steps 1 "${gpu[@]}"
    bench sample_nfe50 60 --model DiT-S/2 --no-train --sample-steps 50 "${gpu[@]}"
    bench b2_compiled 120 --model DiT-B/2 --compile --no-sample "${gpu[@]}"
    bench b2_eager 60 --model DiT-B/2 --no-compile --no-sample "${gpu[@]}"
}

# 4. MeanFlow's training img/s next to flow's (the bench_s2_compiled row), once the benchmark has --objective
# with a meanflow choice
part_meanflow() {
    wait "$HELP_PID"
    if ! grep -q -- --objective "$WORK/bench_help.txt" || ! grep -q meanflow "$WORK/bench_help.txt"; then
        skip bench_meanflow "python -m benchmarks.benchmark has no --objective meanflow (no MeanFlow objective yet)"
        return
    fi
    if (( QUICK )); then
        bench meanflow 90 --objective meanflow --device cpu --model DiT-XS/2 --image-size 8 --batch-size 4 \
            --steps 2 --warmup 1 --num-images 16 --no-sample --peak-seconds 0.05 --threads 1 --no-compile
    else
        bench meanflow 120 --objective meanflow --model DiT-S/2 --compile --no-sample --device cuda \
            --batch-size 256 --steps 50 --warmup 10 --precision bf16
    fi
}

# Reads everything the parts left in $WORK, writes $OUT/summary.json and prints the key numbers last.
# Exit status 1 when a part failed or timed out.
summarize() {
    "$PY" - "$WORK" "$OUT" "$QUICK" "$BUDGET" "$(elapsed_s)" "${INSTALLED:-}" <<'EOF'
import glob, json, math, os, sys
import xml.etree.ElementTree as ET

work, out, quick, budget, seconds, installed = sys.argv[1:7]
summary = {"mode": "quick-cpu" if quick == "1" else "gpu", "seconds": int(seconds), "budget_s": int(budget),
           "installed_wheels": installed.split(), "work": work}
try:
    summary["env"] = json.load(open(f"{work}/env.json"))
except (OSError, ValueError):
    summary["env"] = {}
parts = []
for line in open(f"{work}/parts.tsv").read().splitlines():
    name, status, rc, ms, limit, note = (line.split("\t") + [""] * 6)[:6]
    parts.append({"name": name, "status": status, "rc": None if rc == "-" else int(rc),
                  "seconds": round(int(ms) / 1000, 1), "limit_s": None if limit == "-" else int(limit), "note": note})
summary["parts"] = parts
by_name = {p["name"]: p for p in parts}

def num(x, fmt=".3g"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

# ---- 1. tests: outcome and recorded numbers of every test
cases = []
if os.path.exists(f"{work}/pytest.xml"):
    for case in ET.parse(f"{work}/pytest.xml").getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message", "")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message[:500], "properties": props})
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
summary["tests"] = {**counts, "cases": cases}
if "tests" in by_name:
    t = by_name["tests"]
    if t["status"] == "ok" and cases and counts["skipped"] == len(cases):
        t["status"], t["note"] = "skipped", f"all {len(cases)} GPU tests skipped: {cases[0]['message']}"
    elif cases:
        t["note"] = ", ".join(f"{v} {k}" for k, v in counts.items() if v)

# ---- 2. the digits run: losses from metrics.jsonl, compile fallback, samples classified by a digits classifier
train = {}
rows = []
try:
    for line in open(f"{work}/digits/metrics.jsonl"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
except OSError:
    pass
losses = [(r.get("step"), v) for r in rows for k, v in r.items()
          if k.split("/")[-1] == "loss" and isinstance(v, (int, float))]  # train/loss; non-finite ones are strings
if losses:
    train.update(first_step=losses[0][0], first_loss=losses[0][1], final_step=losses[-1][0], final_loss=losses[-1][1])
if "train" in by_name:
    logs = " ".join(open(f).read() for f in glob.glob(f"{work}/train.log") + glob.glob(f"{work}/resume.log"))
    train["compile"] = "off (quick CPU mode)" if quick == "1" else (
        "fell back to eager" if "torch.compile failed" in logs else "on")
    train["exit_codes"] = {k: by_name[k]["rc"] for k in ("train", "resume", "sample") if k in by_name}
if os.path.exists(f"{work}/digits_samples.npz"):
    try:  # the EMA samples, told apart by a classifier of the real digits (chance: 0.1); not after 30 quick steps
        import numpy as np

        npz = np.load(f"{work}/digits_samples.npz")
        images, labels = npz["images"], npz["labels"]
        train["samples"] = len(images)
        if quick != "1":
            from sklearn.datasets import load_digits
            from sklearn.linear_model import LogisticRegression

            digits = load_digits()
            clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
            train["sample_accuracy"] = float((clf.predict(images.reshape(len(images), -1) / 255.0) == labels).mean())
    except Exception as e:  # a number for the reader; never a reason to fail the check
        train["sample_accuracy_error"] = f"{type(e).__name__}: {e}"
summary["train"] = train

# ---- 3./4. benchmarks: every result whole, and one flat row per training and sampling measurement
bench = {"results": {}, "train": [], "sample": []}
order = {p["name"]: i for i, p in enumerate(parts)}  # rows in the order they ran
for path in sorted(glob.glob(f"{work}/bench_*.json"), key=lambda f: order.get(os.path.basename(f)[:-5], len(order))):
    name = os.path.basename(path)[len("bench_"):-len(".json")]
    result = json.load(open(path))
    bench["results"][name] = result
    model = result.get("model", {}).get("name")
    for r in result.get("train", []):
        bench["train"].append({
            "run": name, "model": model, "objective": result.get("config", {}).get("objective", "flow"),
            "compiled": r.get("compiled"), "precision": r.get("precision"), "batch": r.get("batch_size"),
            "img_per_s": r.get("img_per_s"), "mfu": r.get("mfu"), "step_ms": r.get("step_ms"),
            "peak_memory_gib": (r.get("peak_memory_bytes") or 0) / 2**30, "peak_memory_kind": r.get("peak_memory_kind"),
            "host_syncs_per_step": r.get("host_syncs_per_step")})
    for s in result.get("sample", []):
        bench["sample"].append({
            "run": name, "model": model, "nfe": s.get("nfe"), "cfg_scale": s.get("cfg_scale"), "n": s.get("n"),
            "precision": s.get("precision"), "img_per_s": s.get("img_per_s"), "mfu": s.get("mfu"),
            "seconds": s.get("seconds"), "peak_memory_gib": (s.get("peak_memory_bytes") or 0) / 2**30})
summary["bench"] = bench
flow_rows = {r["run"]: r for r in bench["train"]}
if "meanflow" in flow_rows and "s2_compiled" in flow_rows:
    summary["meanflow"] = {"meanflow_img_per_s": flow_rows["meanflow"]["img_per_s"],
                           "flow_img_per_s": flow_rows["s2_compiled"]["img_per_s"]}

# findings that fail no part but defeat the purpose of a row: say them loudly
warnings = []
if quick != "1" and train.get("compile", "on") != "on":
    warnings.append("train: torch.compile fell back to eager")
for r in bench["train"]:
    if "compiled" in r["run"] and not r["compiled"]:
        warnings.append(f"bench_{r['run']}: torch.compile fell back to eager")
    if r["host_syncs_per_step"]:
        warnings.append(f"bench_{r['run']}: {r['host_syncs_per_step']} host synchronisations per training step")
summary["warnings"] = warnings
bad = [p["name"] for p in parts if p["status"] in ("failed", "timeout")]
summary["ok"] = not bad
with open(f"{out}/summary.json", "w") as f:
    json.dump(summary, f, indent=1)
    f.write("\n")

# ---- the key numbers, printed last so that a log's tail shows them
env = summary["env"]
print("\n" + "=" * 100)
print(f"gpu_check {summary['mode']}: {env.get('gpu', 'no GPU')}, driver {env.get('driver', 'n/a')}, torch "
      f"{env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}; {seconds}s of a {budget}s budget")
print(f"\n{'part':22s} {'status':8s} {'exit':>4s} {'seconds':>8s} {'limit':>6s}  note")
for p in parts:
    print(f"{p['name']:22s} {p['status']:8s} {num(p['rc'], 'd'):>4s} {p['seconds']:8.1f} "
          f"{num(p['limit_s'], 'd'):>6s}  {p['note']}")
props = {k: v for c in cases for k, v in c["properties"].items()}
if any(c["outcome"] != "skipped" for c in cases):
    print("\ntests: " + "; ".join(f"{k} {v}" for k, v in props.items() if k != "attention_ops_and_kernels"))
    for c in cases:
        if c["outcome"] in ("failed", "error"):
            print(f"  {c['outcome']}: {c['name']}: {c['message'][:300]}")
if train:
    print(f"\ntrain (digits): loss {num(train.get('first_loss'))} at step {train.get('first_step')} -> "
          f"{num(train.get('final_loss'))} at step {train.get('final_step')}; compile {train.get('compile')}; "
          f"exit codes {train.get('exit_codes')}; EMA sample accuracy {num(train.get('sample_accuracy'))} "
          f"(chance 0.1)")
if bench["train"]:
    print(f"\n{'training run':16s} {'model':8s} {'objective':9s} {'mode':8s} {'batch':>5s} {'img/s':>9s} {'MFU':>6s} "
          f"{'step ms':>8s} {'peak mem':>9s} {'syncs/step':>10s}")
    for r in bench["train"]:
        mode = "compiled" if r["compiled"] else "eager"
        print(f"{r['run']:16s} {str(r['model']):8s} {str(r['objective']):9s} {mode:8s} {num(r['batch'], 'd'):>5s} "
              f"{num(r['img_per_s'], '.1f'):>9s} {num(r['mfu'] and 100 * r['mfu'], '.1f'):>5s}% "
              f"{num(r['step_ms'], '.1f'):>8s} {r['peak_memory_gib']:5.2f} GiB "
              f"{num(r['host_syncs_per_step'], 'd'):>10s}")
if bench["sample"]:
    print(f"\n{'sampling run':16s} {'model':8s} {'NFE':>4s} {'cfg':>4s} {'n':>5s} {'img/s':>9s} {'MFU':>6s} "
          f"{'peak mem':>9s}")
    for s in bench["sample"]:
        print(f"{s['run']:16s} {str(s['model']):8s} {num(s['nfe'], 'd'):>4s} {num(s['cfg_scale'], 'g'):>4s} "
              f"{num(s['n'], 'd'):>5s} {num(s['img_per_s'], '.1f'):>9s} {num(s['mfu'] and 100 * s['mfu'], '.1f'):>5s}% "
              f"{s['peak_memory_gib']:5.2f} GiB")
if "meanflow" in summary:
    m = summary["meanflow"]
    print(f"\nMeanFlow {num(m['meanflow_img_per_s'], '.1f')} img/s against flow {num(m['flow_img_per_s'], '.1f')} "
          "img/s (DiT-S/2, batch 256, bf16, compiled)")
if warnings:
    print("\n" + "\n".join(f"warning: {w}" for w in warnings))
print(f"\n{'OK' if summary['ok'] else 'FAILED: ' + ', '.join(bad)}; wrote {out}/summary.json and {out}/gpu_check.log")
sys.exit(0 if summary["ok"] else 1)
EOF
}

run_parts() {
    say "gpu_check run in $ROOT; OUT=$OUT; work folder $WORK; budget ${BUDGET}s"
    export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
    # POT (imported by torchcfm) would import JAX, CuPy and TensorFlow for backends this repository never uses
    export POT_BACKEND_DISABLE_JAX=${POT_BACKEND_DISABLE_JAX:-1}
    export POT_BACKEND_DISABLE_CUPY=${POT_BACKEND_DISABLE_CUPY:-1}
    export POT_BACKEND_DISABLE_TENSORFLOW=${POT_BACKEND_DISABLE_TENSORFLOW:-1}
    probe || { record machine failed 1 0 - "$PY could not import torch"; summarize; return 1; }
    install_wheels || record install failed 1 0 - "missing packages were not installed (see above)"
    if (( ! CUDA )) && (( ! QUICK )); then
        say "no CUDA device: quick CPU mode (tiny sizes; CUDA-only parts are reported as skipped)"
        QUICK=1
    fi
    if (( QUICK )); then  # everything on the CPU, also where a GPU is present
        export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: one thread is fastest
    fi
    if wanted meanflow; then  # the benchmark's flags, for part 4: read now, beside part 1 (its imports take seconds)
        "$PY" -m benchmarks.benchmark --help >"$WORK/bench_help.txt" 2>&1 &
        HELP_PID=$!
    fi
    wanted tests && part_tests
    wanted train && part_train
    wanted bench && part_bench
    wanted meanflow && part_meanflow
    summarize
}

run() {
    QUICK=${GPU_CHECK_QUICK:-0}
    local arg
    for arg in "$@"; do
        case $arg in
            --quick) QUICK=1 ;;
            *) echo "gpu_check.sh run: unknown argument $arg" >&2; return 2 ;;
        esac
    done
    pick_python
    BUDGET=${GPU_CHECK_BUDGET_S:-450}
    PARTS=${GPU_CHECK_PARTS:-tests,train,bench,meanflow}
    RESERVE=10   # seconds kept for the summary
    MIN_STEP=15  # a step with less time than this left is skipped rather than started
    CUDA=0
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
    WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")}
    mkdir -p "$OUT" "$WORK" || return 1
    : >"$WORK/parts.tsv"
    run_parts 2>&1 | tee "$OUT/gpu_check.log"
    return "${PIPESTATUS[0]}"
}

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

case ${1:-help} in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    help | -h | --help) usage ;;
    *) usage >&2; exit 2 ;;
esac
