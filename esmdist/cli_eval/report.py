"""`esmdist eval report`: every measurement of the ESM-1b paper on one model and the bundled
sets (data/eval/), written as report.md (tables and figures) and metrics.json; and
`esmdist plot RUN_DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esmdist.cli_eval.common import EVAL_DATA, add_model_arguments, model_from_args, write_results
from esmdist.cli_eval.sequence import dms_spearman, held_out_perplexity, wild_type
from esmdist.cli_eval.structure import contact_rows, homology_results, plot_chain_contacts
from esmdist.eval.contacts import NO_PREDICTION, mean_metrics
from esmdist.eval.published import NONE, published
from esmdist.eval.structure import read_structures
from esmdist.storage import writing

YAP1 = "dms/YAP1_HUMAN_Fields2012-singles-linear"
BUNDLED = ("the bundled sets are small and differ from the papers' (12 Kortemme Pfam domains, "
           "one 36-residue DMS, 511 CB513 chains, 893 SCOP domains): a published figure is for "
           "scale, not a target")  # fmt: skip


def _contacts(model, args, data: Path, out: Path) -> dict:
    fit_on = read_structures([str(data / "structures" / "fit")])
    test = read_structures([str(data / "structures" / "test")])
    rows = contact_rows(model, test, fit_on)
    write_results(str(out), "contacts", {"model": args.model}, rows)
    plot_chain_contacts(model, test[:1], str(out / "contact_map.png"))
    return {**mean_metrics(rows), "fit_structures": len(fit_on), "test_structures": len(test)}


def _variants(model, data: Path, out: Path) -> dict:
    from esmdist.cli_eval.sequence import plot_dms
    from esmdist.eval.variants import read_dms

    dms, sequence = str(data / YAP1 / "data.csv"), wild_type(str(data / YAP1 / "wt.fasta"))
    table = read_dms(dms, "mutant", "log_fitness", sequence, 170)
    summary, rows = dms_spearman(model, dms, sequence, "log_fitness", table)
    write_results(str(out), "variants", summary, rows)
    plot_dms(summary, rows, "log_fitness", out / "variants.png")
    return summary


def _secondary(model, args, data: Path, out: Path) -> dict:
    from esmdist.eval.secondary import read_netsurfp, score_probes, train_probes

    train_file = data / "ss" / "netsurfp2_train_2k.csv.gz"
    train = read_netsurfp(train_file, args.ss_train_chains)
    test = read_netsurfp(data / "ss" / "CB513_HHblits.csv.gz", args.ss_test_chains)
    probes = train_probes(model, train, model.config.num_layers, str(train_file),
                          args.max_train_residues)  # fmt: skip
    found = {**score_probes(model, probes, test), "train_chains": len(train),
             "test_chains": len(test)}  # fmt: skip
    write_results(str(out), "ss_probe", {"model": args.model, **found},
                  [{"metric": k, "value": v} for k, v in found.items()])  # fmt: skip
    return found


def _homology(model, args, data: Path, out: Path) -> dict:
    import torch

    from esmdist.eval.plot import plot_projection
    from esmdist.model import build_model

    fasta = data / "scop" / "scop175_id40.fasta.gz"
    found, domains, vectors = homology_results(model, str(fasta), -1, 16384)
    classes = [f"SCOP class {d.sccs[0]}" for d in domains]
    plot_projection(vectors, classes, f"{fasta.name}: mean embeddings (PCA)",
                    out / "embedding_projection.png")  # fmt: skip
    torch.manual_seed(0)  # the baseline: an untrained model of this size, the same every time
    random = build_model(model.config).eval().to(next(model.parameters()).device)
    baseline, _, _ = homology_results(random, str(fasta), -1, 16384)
    found.update({f"random_model_{k}": v for k, v in baseline.items() if "hit" in k})
    write_results(str(out), "homology", {"model": args.model, **found},
                  [{"metric": k, "value": v} for k, v in found.items()])  # fmt: skip
    return found


def _value(value: float | None) -> str:
    return NO_PREDICTION if value is None else f"{value:.3f}"


def _contacts_section(c: dict, config) -> list[str]:
    lines = ["## Unsupervised contacts", "",
             f"Regression fitted on {c['fit_structures']} structures, scored on "
             f"{c['test_structures']} others (`contacts.csv` per structure). Random ranking: "
             "the expected precision of scores in random order, i.e. each range's contact "
             "density.", "", "| range | P@L | P@L/2 | P@L/5 | AUC | random ranking P@L |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in ("short", "medium", "long"):
        if c[f"mean_{r}_P@L"] is None:
            cells = f"{NO_PREDICTION} | | | "
        else:
            cells = " | ".join(f"{c[f'mean_{r}_{k}']:.3f}" for k in ("P@L", "P@L2", "P@L5", "AUC"))
        lines.append(f"| {r} | {cells} | {c[f'mean_random_{r}_P@L']:.3f} |")
    return [*lines, "", f"Published: {published(config, 'contacts_long_P@L')}.", "",
            "![contact map](contact_map.png)", ""]  # fmt: skip


def _markdown(metrics: dict, config) -> str:
    v, s, h = (metrics[k] for k in ("variants", "ss", "homology"))
    lines = [f"# Evaluation of `{metrics['model']}`", "",
             f"{metrics['arch']}, {metrics['parameters']:,} parameters. Every number stands "
             f"beside a baseline computed in the same run; {BUNDLED}.", ""]  # fmt: skip
    if "perplexity" in metrics:
        p = metrics["perplexity"]
        lines += ["## Held-out perplexity", "", "| masked-LM perplexity | unigram baseline |",
                  "|---:|---:|", f"| {p['perplexity']:.3f} | {p['unigram_perplexity']:.3f} |", "",
                  f"Published: {NONE} on these shards (the papers' perplexities are on their own "
                  "UniRef50 validation sets).", ""]  # fmt: skip
    lines += _contacts_section(metrics["contacts"], config)
    lines += ["## Variant effects", "",
              f"`{v['dms']}`: {v['variants']} variants, {v['scoring']}, Spearman ρ = "
              f"{v['spearman']:.3f}; random scores: |ρ| {v['random_abs_spearman_mean']:.3f} on "
              f"average, 95% of draws below {v['random_abs_spearman_p95']:.3f}. Published: "
              f"{published(config, 'proteingym_spearman')}.", "",
              "![variant effects](variants.png)", "",
              "## Secondary structure (linear probe)", "",
              f"Trained on {s['train_chains']} NetSurfP-2.0 chains, scored on {s['test_chains']} "
              f"CB513 chains ({s['residues']:,} residues): Q3 = {s['q3']:.3f} (the commonest state "
              f"always: {s['majority_q3']:.3f})"
              + (f", Q8 = {s['q8']:.3f}" if "q8" in s else " (Q8 needs 8-state training labels)")
              + f". Published: {published(config, 'ss_q8')}.", "",
              "## Remote homology (SCOP 1.75)", "",
              "| level | queries | Hit-1 | Hit-10 | untrained model of this size: Hit-10 |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {lvl} | {h[f'{lvl}_queries']} | {h[f'{lvl}_hit1']:.3f} | "
              f"{h[f'{lvl}_hit10']:.3f} | {h[f'random_model_{lvl}_hit10']:.3f} |"
              for lvl in ("superfamily", "fold")]  # fmt: skip
    lines += ["", "The ESM-1b paper's Table 2 reports Hit-10 with a larger SCOPe database; no "
              "published figure on this set.", "",
              "![embedding projection](embedding_projection.png)", "", "## What this shows", "",
              *[f"- {line}" for line in _verdicts(metrics)], ""]  # fmt: skip
    return "\n".join(lines)


def _verdicts(metrics: dict) -> list[str]:
    """Per measurement, whether the model clears the baseline beside it."""
    c, v, s, h = (metrics[k] for k in ("contacts", "variants", "ss", "homology"))
    found = []
    if "perplexity" in metrics:
        p = metrics["perplexity"]
        better = p["perplexity"] < p["unigram_perplexity"]
        found.append(f"held-out perplexity {'below' if better else 'not below'} the unigram "
                     f"baseline ({p['perplexity']:.3f} vs {p['unigram_perplexity']:.3f})")  # fmt: skip
    if c["mean_long_P@L"] is None:
        found.append("contacts: no prediction — the attention carries no contact signal the "
                     "regression could use")  # fmt: skip
    else:
        ahead = c["mean_long_P@L"] > c["mean_random_long_P@L"]
        found.append(f"contacts: long-range P@L {'above' if ahead else 'not above'} random "
                     f"ranking ({c['mean_long_P@L']:.3f} vs {c['mean_random_long_P@L']:.3f})")  # fmt: skip
    clear = abs(v["spearman"]) > v["random_abs_spearman_p95"]
    found.append(f"variants: |ρ| {abs(v['spearman']):.3f} is {'beyond' if clear else 'within'} "
                 f"what random scores reach (95%: {v['random_abs_spearman_p95']:.3f})")  # fmt: skip
    found.append(f"secondary structure: Q3 {s['q3']:.3f} vs {s['majority_q3']:.3f} for the "
                 "commonest state (a probe on any features learns residue propensities)")  # fmt: skip
    found.append(f"remote homology: fold Hit-10 {h['fold_hit10']:.3f} vs "
                 f"{h['random_model_fold_hit10']:.3f} for an untrained model of this size")  # fmt: skip
    return found


def _cmd_report(args: argparse.Namespace) -> int:
    data = Path(args.eval_data)
    if not (data / "structures" / "fit").is_dir():
        raise FileNotFoundError(f"{data}: not the evaluation sets of data/eval (--eval-data)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_from_args(args)
    metrics: dict = {"model": args.model, "arch": model.config.arch,
                     "parameters": model.config.num_params()}  # fmt: skip
    if args.shards:
        found = held_out_perplexity(model, args.shards, "valid", 16384, args.crop_length)
        write_results(str(out), "perplexity", {"model": args.model, **found},
                      [{"metric": k, "value": v} for k, v in found.items()])  # fmt: skip
        metrics["perplexity"] = found
    metrics["contacts"] = _contacts(model, args, data, out)
    metrics["variants"] = _variants(model, data, out)
    metrics["ss"] = _secondary(model, args, data, out)
    metrics["homology"] = _homology(model, args, data, out)
    with writing(out):
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "report.md").write_text(_markdown(metrics, model.config))
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'}\n" + headline_summary(metrics))
    return 0


def headline_summary(metrics: dict) -> str:
    """The headline numbers, one line each, each beside its baseline; then what they show."""
    c, v, s, h = (metrics[k] for k in ("contacts", "variants", "ss", "homology"))
    lines = []
    if "perplexity" in metrics:
        p = metrics["perplexity"]
        lines.append(f"held-out perplexity      {p['perplexity']:.3f}  (unigram baseline "
                     f"{p['unigram_perplexity']:.3f})")  # fmt: skip
    lines += [f"contacts long-range P@L  {_value(c['mean_long_P@L'])}  (random ranking "
              f"{c['mean_random_long_P@L']:.3f})",
              f"YAP1 DMS Spearman ρ      {v['spearman']:.3f}  (random scores: 95% of |ρ| below "
              f"{v['random_abs_spearman_p95']:.3f})",
              f"CB513 Q3 (linear probe)  {s['q3']:.3f}  (commonest state always: "
              f"{s['majority_q3']:.3f})",
              f"SCOP fold Hit-10         {h['fold_hit10']:.3f}  (untrained model of this size "
              f"{h['random_model_fold_hit10']:.3f})", "what this shows:",
              *[f"  {line}" for line in _verdicts(metrics)],
              f"report.md: each published figure matched to this model's size, where there is one; "
              f"{BUNDLED}"]  # fmt: skip
    return "\n".join(lines)


def add_report(eval_sub) -> None:
    report = eval_sub.add_parser(
        "report",
        help="every evaluation on the bundled sets: report.md, metrics.json and the figures",
        description="Held-out perplexity (with --shards), contacts (regression fitted on 20 "
        "Pfam domains, scored on 12 others), one DMS ρ (YAP1), a Q3/Q8 linear probe "
        "(NetSurfP-2.0 → CB513), SCOP remote homology and an embedding projection, on one "
        "model; each beside a baseline computed in the same run (random ranking, random "
        "scores, the commonest state, an untrained model of the same size) and the published "
        "figure of the same size, where there is one. JSON + CSV per measurement.",
    )
    add_model_arguments(report)
    report.add_argument("--out", required=True, help="directory for report.md and the rest")
    report.add_argument("--shards", help="a sharded dataset: adds its held-out perplexity")
    report.add_argument("--crop-length", type=int, default=1024, help="as for eval perplexity")
    report.add_argument("--eval-data", default=str(EVAL_DATA),
                        help="the bundled evaluation sets (default: %(default)s)")  # fmt: skip
    report.add_argument("--ss-train-chains", type=int, help="first N probe training chains")
    report.add_argument("--ss-test-chains", type=int, help="first N CB513 chains")
    report.add_argument("--max-train-residues", type=int, default=200_000,
                        help="probe training residues, a seeded sample (%(default)s)")  # fmt: skip
    report.set_defaults(func=_cmd_report, contact_regression=None)


def _cmd_plot(args: argparse.Namespace) -> int:
    from esmdist.eval.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def add_plot(sub) -> None:
    plot = sub.add_parser("plot", help="plot a run's metrics.jsonl (loss, validation "
                          "perplexity, tokens/s, learning rate vs step) to a PNG")  # fmt: skip
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the run's train.output_dir")
    plot.add_argument("--out", help="the PNG to write (default RUN_DIR/metrics.png)")
    plot.set_defaults(func=_cmd_plot)
