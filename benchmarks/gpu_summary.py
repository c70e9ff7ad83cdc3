"""The GPU check's summary (see benchmarks/gpu_check.py): reads what the parts left in the work folder (env.json,
pytest.xml, the digits run's metrics.jsonl and samples, the benchmarks' JSON) and the parts' records, builds
summary.json and the report of the key numbers printed last.

Standard library only at the top (numpy and scikit-learn are imported where the samples are classified): `prepare`
imports it before the project's packages are installed.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path


def _num(x, fmt: str = ".3g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _test_cases(junit_xml: Path) -> list[dict]:
    cases = []
    if junit_xml.exists():
        for case in ET.parse(junit_xml).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
                node = case.find(tag)
                if node is not None:
                    outcome, message = name, node.get("message", "")
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            cases.append(
                {
                    "name": case.get("name"),
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0)),
                    "message": message[:500],
                    "properties": props,
                }
            )
    return cases


def _train_summary(work: Path, quick: bool, by_name: dict[str, dict]) -> dict:
    """The digits run: losses from metrics.jsonl, compile fallback, samples classified by a digits classifier."""
    train, rows = {}, []
    try:
        for line in open(work / "digits" / "metrics.jsonl"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    except OSError:
        pass
    losses = [
        (r.get("step"), v)
        for r in rows
        for k, v in r.items()
        if k.split("/")[-1] == "loss" and isinstance(v, int | float)
    ]  # non-finite ones are strings
    if losses:
        train.update(
            first_step=losses[0][0], first_loss=losses[0][1], final_step=losses[-1][0], final_loss=losses[-1][1]
        )
    if "train" in by_name:
        logs = " ".join(p.read_text() for p in (work / "train.log", work / "resume.log") if p.exists())
        train["compile"] = (
            "off (quick CPU mode)" if quick else "fell back to eager" if "torch.compile failed" in logs else "on"
        )
        train["exit_codes"] = {k: by_name[k]["rc"] for k in ("train", "resume", "sample") if k in by_name}
    if (work / "digits_samples.npz").exists():
        try:  # the EMA samples, told apart by a classifier of the real digits (chance: 0.1); not after 30 quick steps
            import numpy as np

            npz = np.load(work / "digits_samples.npz")
            images, labels = npz["images"], npz["labels"]
            train["samples"] = len(images)
            if not quick:
                from sklearn.datasets import load_digits
                from sklearn.linear_model import LogisticRegression

                digits = load_digits()
                clf = LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)
                predicted = clf.predict(images.reshape(len(images), -1) / 255.0)
                train["sample_accuracy"] = float((predicted == labels).mean())
        except Exception as e:  # a number for the reader; never a reason to fail the check
            train["sample_accuracy_error"] = f"{type(e).__name__}: {e}"
    return train


def _bench_summary(work: Path, parts: list[dict]) -> dict:
    """Every benchmark result whole, and one flat row per training and sampling measurement, in the order run."""
    bench = {"results": {}, "train": [], "sample": []}
    order = {p["name"]: i for i, p in enumerate(parts)}
    for path in sorted(work.glob("bench_*.json"), key=lambda f: order.get(f.stem, len(order))):
        name = path.stem[len("bench_") :]
        result = json.loads(path.read_text())
        bench["results"][name] = result
        model = result.get("model", {}).get("name")
        for r in result.get("train", []):
            bench["train"].append(
                {
                    "run": name,
                    "model": model,
                    "objective": result.get("config", {}).get("objective", "flow"),
                    "compiled": r.get("compiled"),
                    "precision": r.get("precision"),
                    "batch": r.get("batch_size"),
                    "img_per_s": r.get("img_per_s"),
                    "mfu": r.get("mfu"),
                    "step_ms": r.get("step_ms"),
                    "peak_memory_gib": (r.get("peak_memory_bytes") or 0) / 2**30,
                    "peak_memory_kind": r.get("peak_memory_kind"),
                    "host_syncs_per_step": r.get("host_syncs_per_step"),
                }
            )
        for s in result.get("sample", []):
            bench["sample"].append(
                {
                    "run": name,
                    "model": model,
                    "nfe": s.get("nfe"),
                    "cfg_scale": s.get("cfg_scale"),
                    "n": s.get("n"),
                    "precision": s.get("precision"),
                    "img_per_s": s.get("img_per_s"),
                    "mfu": s.get("mfu"),
                    "seconds": s.get("seconds"),
                    "peak_memory_gib": (s.get("peak_memory_bytes") or 0) / 2**30,
                }
            )
    return bench


def summarize(work: Path, parts: list[dict], *, quick: bool, budget_s: int, seconds: int, installed: list[str]) -> dict:
    """summary.json from the records of the parts and what they left in work. Marks the tests part skipped when
    every GPU test was skipped."""
    summary = {
        "mode": "quick-cpu" if quick else "gpu",
        "seconds": seconds,
        "budget_s": budget_s,
        "installed_wheels": installed,
        "work": str(work),
    }
    try:
        summary["env"] = json.loads((work / "env.json").read_text())
    except (OSError, ValueError):
        summary["env"] = {}
    summary["parts"] = parts
    by_name = {p["name"]: p for p in parts}

    cases = _test_cases(work / "pytest.xml")
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    summary["tests"] = {**counts, "cases": cases}
    if "tests" in by_name:
        t = by_name["tests"]
        if t["status"] == "ok" and cases and counts["skipped"] == len(cases):
            t["status"], t["note"] = "skipped", f"all {len(cases)} GPU tests skipped: {cases[0]['message']}"
        elif cases:
            t["note"] = ", ".join(f"{v} {k}" for k, v in counts.items() if v)

    summary["train"] = train = _train_summary(work, quick, by_name)
    summary["bench"] = bench = _bench_summary(work, parts)
    rows = {r["run"]: r for r in bench["train"]}
    if "meanflow" in rows and "s2_compiled" in rows:
        summary["meanflow"] = {
            "meanflow_img_per_s": rows["meanflow"]["img_per_s"],
            "flow_img_per_s": rows["s2_compiled"]["img_per_s"],
        }

    try:  # the latent rows: DiT-XL/2 on ImageNet-shaped latents and the VAE's decode throughput
        summary["vae_decode"] = json.loads((work / "vae_decode.json").read_text())
    except (OSError, ValueError):
        summary["vae_decode"] = None

    warnings = []  # findings that fail no part but defeat the purpose of a row: said loudly
    if not quick and train.get("compile", "on") != "on":
        warnings.append("train: torch.compile fell back to eager")
    for r in bench["train"]:
        if "compiled" in r["run"] and not r["compiled"]:
            warnings.append(f"bench_{r['run']}: torch.compile fell back to eager")
        if r["host_syncs_per_step"]:
            warnings.append(f"bench_{r['run']}: {r['host_syncs_per_step']} host synchronisations per training step")
    summary["warnings"] = warnings
    summary["ok"] = not any(p["status"] in ("failed", "timeout") for p in parts)
    return summary


def report(summary: dict, out: Path) -> str:
    """The key numbers, printed last so that a log's tail shows them."""
    env, parts, train, bench = summary["env"], summary["parts"], summary["train"], summary["bench"]
    cases = summary["tests"]["cases"]
    lines = [
        "",
        "=" * 100,
        f"gpu_check {summary['mode']}: {env.get('gpu', 'no GPU')}, driver {env.get('driver', 'n/a')}, torch "
        f"{env.get('torch')}, CUDA {env.get('cuda')}, Python {env.get('python')}; {summary['seconds']}s of a "
        f"{summary['budget_s']}s budget",
        "",
        f"{'part':22s} {'status':8s} {'exit':>4s} {'seconds':>8s} {'limit':>6s}  note",
    ]
    for p in parts:
        lines.append(
            f"{p['name']:22s} {p['status']:8s} {_num(p['rc'], 'd'):>4s} {p['seconds']:8.1f} "
            f"{_num(p['limit_s'], 'd'):>6s}  {p['note']}"
        )
    if any(c["outcome"] != "skipped" for c in cases):
        props = {k: v for c in cases for k, v in c["properties"].items()}
        lines += ["", "tests: " + "; ".join(f"{k} {v}" for k, v in props.items() if k != "attention_ops_and_kernels")]
        lines += [
            f"  {c['outcome']}: {c['name']}: {c['message'][:300]}" for c in cases if c["outcome"] in ("failed", "error")
        ]
    if train:
        lines += [
            "",
            f"train (digits): loss {_num(train.get('first_loss'))} at step {train.get('first_step')} -> "
            f"{_num(train.get('final_loss'))} at step {train.get('final_step')}; compile {train.get('compile')}; "
            f"exit codes {train.get('exit_codes')}; EMA sample accuracy {_num(train.get('sample_accuracy'))} "
            "(chance 0.1)",
        ]
    if bench["train"]:
        lines += [
            "",
            f"{'training run':16s} {'model':8s} {'objective':9s} {'mode':8s} {'batch':>5s} {'img/s':>9s} "
            f"{'MFU':>6s} {'step ms':>8s} {'peak mem':>9s} {'syncs/step':>10s}",
        ]
        for r in bench["train"]:
            mode = "compiled" if r["compiled"] else "eager"
            lines.append(
                f"{r['run']:16s} {str(r['model']):8s} {str(r['objective']):9s} {mode:8s} "
                f"{_num(r['batch'], 'd'):>5s} {_num(r['img_per_s'], '.1f'):>9s} "
                f"{_num(r['mfu'] and 100 * r['mfu'], '.1f'):>5s}% {_num(r['step_ms'], '.1f'):>8s} "
                f"{r['peak_memory_gib']:5.2f} GiB {_num(r['host_syncs_per_step'], 'd'):>10s}"
            )
    if bench["sample"]:
        lines += [
            "",
            f"{'sampling run':16s} {'model':8s} {'NFE':>4s} {'cfg':>4s} {'n':>5s} {'img/s':>9s} {'MFU':>6s} "
            f"{'peak mem':>9s}",
        ]
        for s in bench["sample"]:
            lines.append(
                f"{s['run']:16s} {str(s['model']):8s} {_num(s['nfe'], 'd'):>4s} "
                f"{_num(s['cfg_scale'], 'g'):>4s} {_num(s['n'], 'd'):>5s} {_num(s['img_per_s'], '.1f'):>9s} "
                f"{_num(s['mfu'] and 100 * s['mfu'], '.1f'):>5s}% "
                f"{s['peak_memory_gib']:5.2f} GiB"
            )
    if summary.get("vae_decode"):
        v = summary["vae_decode"]
        lines += [
            "",
            f"VAE decode ({v['vae']}): {_num(v['img_per_s'], '.1f')} img/s, {_num(v['ms_per_batch'], '.1f')} ms "
            f"per batch of {v['batch_size']} latents {v['latent_shape']} -> images {v['image_shape']}, "
            f"{v['precision']}",
        ]
    if "meanflow" in summary:
        m = summary["meanflow"]
        lines += [
            "",
            f"MeanFlow {_num(m['meanflow_img_per_s'], '.1f')} img/s against flow "
            f"{_num(m['flow_img_per_s'], '.1f')} img/s (DiT-S/2, batch 256, bf16, compiled)",
        ]
    if summary["warnings"]:
        lines += [""] + [f"warning: {w}" for w in summary["warnings"]]
    bad = [p["name"] for p in parts if p["status"] in ("failed", "timeout")]
    lines += [
        "",
        f"{'OK' if summary['ok'] else 'FAILED: ' + ', '.join(bad)}; wrote {out}/summary.json and {out}/gpu_check.log",
    ]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, out: Path) -> None:
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
