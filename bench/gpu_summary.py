"""The results of one bench/gpu_check.sh run as one markdown page and one JSON file: where each
GPU target of issue 26 stands, then the tables for docs/PERFORMANCE.md.

    python bench/gpu_summary.py RAW_DIR OUT_DIR   # writes OUT_DIR/summary.md, summary.json

RAW_DIR holds what the benches wrote (`--json` of bench/loop_bench.py, bench/train_bench.py,
bench/step_profile.py, bench/gpu_check.py throughput; gpu.txt, times.tsv, perplexity.txt). A
bench that did not run (skipped for the budget, failed) leaves its rows out and its targets
"unmeasured".
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

LOOPS = {  # file stem → what it ran
    "loop_650M": "650M, configs/esm2_650M.toml",
    "loop_3B": "3B, configs/esm2_3B.toml",
    "loop_35M": "35M, configs/esm2_35M.toml",
    "loop_150M": "150M, configs/esm2_150M.toml",
    "ab_650M_eager": "650M shipped, train.compile=false",
    "ab_650M_autocast": "650M shipped, parallel.low_precision_weights=false",
    "curve_35M": "35M, main job's settings (this checkout)",
}


def read_results(raw: Path) -> dict:
    results = {path.stem: json.loads(path.read_text()) for path in sorted(raw.glob("*.json"))}
    for name in ("gpu.txt", "perplexity.txt"):
        if (raw / name).exists():
            results[name.split(".")[0]] = (raw / name).read_text().strip()
    times = raw / "times.tsv"
    lines = times.read_text().splitlines() if times.exists() else []
    results["steps"] = [dict(zip(("step", "outcome", "seconds"), line.split("\t"), strict=True))
                        for line in lines]  # fmt: skip
    return results


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def verdict(value: float | None, goal: float) -> str:
    return "unmeasured" if value is None else ("met" if value >= goal else "not met")


def targets(results: dict) -> list[dict]:
    """Issue 26's GPU targets against what this run measured (None: not measured; a goal of
    None: reported, not judged)."""
    loop = {name: results.get(name, {}) for name in LOOPS}
    ratios = [loop[n].get("loop_vs_step") for n in ("loop_35M", "loop_150M")]
    curve = results.get("curve_35M", {}).get("loss_check")
    startup = [r.get("startup_s") for r in loop["loop_650M"].get("this_runs", [])]
    hf = results.get("hf_650M", {})
    rows = [
        ("650M shipped config: trainer loop MFU ≥ 50%", loop["loop_650M"].get("this_mfu"), 0.50,
         percent),
        ("3B shipped config: ≥ 30,000 real tokens/s", loop["loop_3B"].get("this"), 30000.0,
         lambda v: f"{v:,.0f} tokens/s"),
        ("35M and 150M: trainer loop ≥ 0.95× the step alone",
         min(ratios) if None not in ratios else None, 0.95, lambda v: f"{v:.2f}× (lower)"),
        ("35M shipped config: MFU ≥ 20%", loop["loop_35M"].get("this_mfu"), 0.20, percent),
        ("bf16 loss curve within noise of the code before issue 16",
         None if curve is None else float(curve["within_noise"]), 1.0,
         lambda v: f"mean Δ {curve['code_difference']:.4f}, seeds {curve['seed_difference']:.4f}"),
        ("650M esmdist vs HF, length-grouped (random batches)", hf.get("ratio"), None,
         lambda v: f"{v:.2f}× ({hf['HF random batches']['ratio']:.2f}×)"),
        ("650M start-up to the first step, cold / warm compile cache",
         startup[0] if startup and None not in startup else None, None,
         lambda v: " / ".join(f"{t:.0f} s" for t in startup)),
    ]  # fmt: skip
    return [{"target": name, "measured": None if value is None else shown(value),
             "value": value, "status": "unmeasured" if value is None else
             ("reported" if goal is None else verdict(value, goal))}
            for name, value, goal, shown in rows]  # fmt: skip


def loop_table(results: dict) -> list[str]:
    """Every trainer-loop run of this check (none: no table)."""
    runs = [(label, results[name]) for name, label in LOOPS.items() if name in results]
    lines = ["| run | micro-batch, recompute | tokens/s | MFU | peak GiB | start-up s | "
             "recompiles | step alone, tokens/s | loop vs step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, found in runs:
        step = found.get("step_level")
        ratio = found.get("loop_vs_step")
        facts = found.get("this_runs") or [{}]
        micro = facts[0].get("micro_batch") or found.get("tokens_per_rank")
        recompute = facts[0].get("recompute_every", 0)
        startup = " / ".join(f"{r['startup_s']:.0f}" for r in facts if "startup_s" in r)
        lines.append(f"| {label} | {micro:,}, {'every ' + str(recompute) if recompute else 'none'} "
                     f"| {found['this']:,.0f} | {percent(found.get('this_mfu'))} | "
                     f"{max((r.get('peak_memory_gib', 0) for r in facts), default=0):.1f} | "
                     f"{startup or '—'} | {max((r.get('recompiles', 0) for r in facts), default=0)} | "
                     f"{'—' if step is None else f'{step:,.0f}'} | "
                     f"{'—' if ratio is None else f'{ratio:.2f}×'} |")  # fmt: skip
    return lines if runs else []


def hf_table(found: dict) -> list[str]:
    lines = [f"{found['model']}, {found['dtype']}, {found['real_tokens']:,.0f} real tokens per "
             f"step, esmdist micro-batches of {found['micro_tokens']:,} (compile "
             f"{found['compile']}); esmdist vs HF length-grouped **{found['ratio']:.2f}×**", "",
             "| side | micro-batch (padded tokens per step) | ms/step | tokens/s | TFLOP/s | MFU | "
             "esmdist × |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for side, row in found.items():
        if isinstance(row, dict) and "step_s" in row:
            shape = (f"≤ {row['micro_tokens']:,} ({row['padded_tokens']:,.0f})"
                     if "micro_tokens" in row else "packed")  # fmt: skip
            lines.append(f"| {side} | {shape} | {1000 * row['step_s']:.1f} | "
                         f"{row['tokens_per_s']:,.0f} | {row['tflops']:,.1f} | "
                         f"{percent(row.get('mfu'))} | {row.get('ratio', 1.0):.2f} |")  # fmt: skip
    return lines


def curve_lines(found: dict) -> list[str]:
    check = found["loss_check"]
    finals = ", ".join(f"{name} {value:.4f}" for name, value in check["final_loss"].items())
    return [f"{check['steps_compared']} logged steps after the warm-up: mean |this − before| "
            f"{check['code_difference']:.4f}, mean |seed 0 − seed 1| {check['seed_difference']:.4f} "
            f"→ {'within noise' if check['within_noise'] else '**outside noise**'}; last "
            f"quarter's mean loss: {finals}. Trainer loop tokens/s, this vs before: "
            f"{found['ratio']:.2f}× ({found['this']:,.0f} vs {found['baseline']:,.0f})."]  # fmt: skip


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| crop | tokens | peak GiB | KiB per token | saved for backward, KiB per token |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['crop']:,} | {r['tokens']:,} | {r['peak_gib']:.2f} | "
              f"{r['kib_per_token']:.1f} | {r['saved_kib_per_token']:.1f} |" for r in rows]  # fmt: skip
    return lines


def throughput_table(rows: list[dict]) -> list[str]:
    lines = ["| model | layout | tokens (padded) | step ms | tokens/s | TFLOP/s | MFU | peak GiB "
             "| × padded |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['size']} | {r['mode']} | {r['tokens']} ({r['padded_tokens']}) | "
              f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{r['mfu']:.1%} | {r['peak_memory_gib']:.1f} | {r['x_padded']:.2f} |"
              for r in rows]  # fmt: skip
    return lines


def profile_lines(found: dict) -> list[str]:
    """bench/step_profile.py's result: time by kind of kernel, then the top kernels."""
    lines = [f"{found['model']}, {found['dtype']}, {found['tokens']:,} tokens, compile "
             f"{found['compile']}: step {found['step_ms']:.1f} ms under the profiler, kernels "
             f"{found['profiled_ms']:.1f} ms of it (device busy {found['busy']:.0%}; "
             f"{found['calls_per_step']:,.0f} kernels per step)", "",
             "| kind | ms per step | share |", "|---|---:|---:|"]  # fmt: skip
    lines += [
        f"| {k} | {row['ms']:.2f} | {row['share']:.1%} |" for k, row in found["kinds"].items()
    ]
    lines += ["", "| kernel | kind | ms per step | share |", "|---|---|---:|---:|"]
    lines += [f"| `{row['name'][:80]}` | {row['kind']} | {row['ms']:.2f} | {row['share']:.1%} |"
              for row in found["top"][:10]]  # fmt: skip
    return lines


def profile_section(results: dict) -> list[str]:
    lines: list[str] = []
    for name in ("profile_650M", "profile_650M_compiled"):
        if name in results:
            lines += [*([""] if lines else []), *profile_lines(results[name])]
    return lines


def page(results: dict, goals: list[dict], date: str) -> str:
    gpu = (results.get("gpu") or "an unnamed GPU").splitlines()[-1]
    lines = [f"# bench/gpu_check.sh on {gpu}, {date}", "", "| target | measured | status |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {g['target']} | {g['measured'] or '—'} | {g['status']} |" for g in goals]
    lines += ["", "| step | outcome | seconds |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['outcome']} | {s['seconds']} |" for s in results["steps"]]
    sections = [("Trainer loop (launcher/pretrain.py, metrics.jsonl)", loop_table(results)),
                ("esmdist vs Hugging Face", "hf_650M" in results and hf_table(results["hf_650M"])),
                ("Main job's loss curve against the code before issue 16's speed changes",
                 "curve_35M" in results and curve_lines(results["curve_35M"])),
                ("Where the step's time goes (bench/step_profile.py)",
                 profile_section(results)),
                ("Memory vs crop length (650M, packed)",
                 "memory_650M" in results and memory_table(results["memory_650M"])),
                ("One training step in three layouts",
                 "throughput" in results and throughput_table(results["throughput"])),
                ("Held-out perplexity of the main job",
                 "perplexity" in results and ["```", results["perplexity"], "```"])]  # fmt: skip
    for title, body in sections:
        if body:
            lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    raw, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = read_results(raw)
    goals = targets(results)
    date = datetime.date.today().isoformat()
    (out / "summary.md").write_text(page(results, goals, date))
    (out / "summary.json").write_text(json.dumps({"date": date, "targets": goals,
                                                  "results": results}, indent=1))  # fmt: skip
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
