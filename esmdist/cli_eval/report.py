"""`esmdist eval report`: every measurement of the ESM-1b paper on one model and the bundled
sets (data/eval/), written as report.md (tables and figures) and metrics.json; and
`esmdist plot RUN_DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from esmdist.cli_eval.common import EVAL_DATA, add_model_arguments, model_from_args, write_results
from esmdist.cli_eval.sequence import dms_spearman, held_out_perplexity, wild_type
from esmdist.cli_eval.structure import (
    contact_rows,
    homology_results,
    mean_metrics,
    plot_chain_contacts,
)
from esmdist.eval.structure import read_structures
from esmdist.storage import writing

YAP1 = "dms/YAP1_HUMAN_Fields2012-singles-linear"
PUBLISHED = {
    "contacts": "long-range P@L of the published models on their test structures: ESM-2 8M "
    "0.159, ESM-2 650M 0.501, ESM-1b 0.411",
    "variants": "ESM-1b mean |ρ| 0.459 over the 41 DMS assays of ESM-1v",
    "ss": "ESM-1b linear probe Q8 0.716 on CB513, trained on all of NetSurfP-2.0's training set",
    "homology": "the ESM-1b paper's Table 2 reports Hit-10 at the fold and superfamily levels "
    "with a larger SCOPe database, not this set",
}


def _contacts(model, args, data: Path, out: Path) -> dict:
    import torch

    from esmdist.model import build_model

    fit_on = read_structures([str(data / "structures" / "fit")])
    test = read_structures([str(data / "structures" / "test")])
    rows = contact_rows(model, test, fit_on)
    write_results(str(out), "contacts", {"model": args.model}, rows)
    plot_chain_contacts(model, test[:1], str(out / "contact_map.png"))
    torch.manual_seed(0)  # the same random baseline every time
    random = build_model(model.config).eval().to(next(model.parameters()).device)
    baseline = mean_metrics(contact_rows(random, test, fit_on))
    return {**mean_metrics(rows), "random_model_mean_long_P@L": baseline["mean_long_P@L"],
            "fit_structures": len(fit_on), "test_structures": len(test)}  # fmt: skip


def _variants(model, data: Path) -> tuple[dict, list[dict]]:
    from esmdist.eval.variants import read_dms

    dms, sequence = str(data / YAP1 / "data.csv"), wild_type(str(data / YAP1 / "wt.fasta"))
    table = read_dms(dms, "mutant", "log_fitness", sequence, 170)
    return dms_spearman(model, dms, sequence, "log_fitness", table)


def _secondary(model, args, data: Path) -> dict:
    from esmdist.eval.secondary import read_netsurfp, score_probes, train_probes

    train_file = data / "ss" / "netsurfp2_train_2k.csv.gz"
    train = read_netsurfp(train_file, args.ss_train_chains)
    test = read_netsurfp(data / "ss" / "CB513_HHblits.csv.gz", args.ss_test_chains)
    probes = train_probes(model, train, model.config.num_layers, str(train_file),
                          args.max_train_residues)  # fmt: skip
    return {**score_probes(model, probes, test), "train_chains": len(train),
            "test_chains": len(test)}  # fmt: skip


def _homology(model, data: Path, out: Path) -> dict:
    from esmdist.eval.plot import plot_projection

    fasta = data / "scop" / "scop175_id40.fasta.gz"
    found, domains, vectors = homology_results(model, str(fasta), -1, 16384)
    classes = [f"SCOP class {d.sccs[0]}" for d in domains]
    plot_projection(vectors, classes, f"{fasta.name}: mean embeddings (PCA)",
                    out / "embedding_projection.png")  # fmt: skip
    return found


def _markdown(metrics: dict) -> str:
    c, v, s, h = (metrics[k] for k in ("contacts", "variants", "ss", "homology"))
    lines = [f"# Evaluation of `{metrics['model']}`", "",
             f"{metrics['arch']}, {metrics['parameters']:,} parameters. Published values are "
             "for scale: they come from models trained on UniRef/UniParc for far longer.", ""]  # fmt: skip
    if "perplexity" in metrics:
        p = metrics["perplexity"]
        lines += ["## Held-out perplexity", "", "| masked-LM perplexity | unigram baseline |",
                  "|---:|---:|", f"| {p['perplexity']:.3f} | {p['unigram_perplexity']:.3f} |", ""]  # fmt: skip
    lines += ["## Unsupervised contacts", "",
              f"Regression fitted on {c['fit_structures']} structures, scored on "
              f"{c['test_structures']} others (`contacts.csv` per structure).", "",
              "| range | P@L | P@L/2 | P@L/5 | AUC |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r} | " + " | ".join(f"{c[f'mean_{r}_{k}']:.3f}" for k in
                                      ("P@L", "P@L2", "P@L5", "AUC")) + " |"
              for r in ("short", "medium", "long")]  # fmt: skip
    lines += ["", f"The same regression fit on a random model of this size: long-range P@L "
              f"{c['random_model_mean_long_P@L']:.3f}. Published: {PUBLISHED['contacts']}.", "",
              "![contact map](contact_map.png)", "", "## Variant effects", "",
              f"`{v['dms']}`: {v['variants']} variants, {v['scoring']}, Spearman ρ = "
              f"{v['spearman']:.3f}. Published: {PUBLISHED['variants']}.", "",
              "## Secondary structure (linear probe)", "",
              f"Trained on {s['train_chains']} NetSurfP-2.0 chains, scored on {s['test_chains']} "
              f"CB513 chains ({s['residues']:,} residues): Q3 = {s['q3']:.3f} (the commonest state "
              f"always: {s['majority_q3']:.3f})"
              + (f", Q8 = {s['q8']:.3f}" if "q8" in s else " (Q8 needs 8-state training labels)")
              + f". Published: {PUBLISHED['ss']}.", "", "## Remote homology (SCOP 1.75)", "",
              "| level | queries | Hit-1 | Hit-10 |", "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {lvl} | {h[f'{lvl}_queries']} | {h[f'{lvl}_hit1']:.3f} | "
              f"{h[f'{lvl}_hit10']:.3f} |" for lvl in ("superfamily", "fold")]  # fmt: skip
    lines += ["", f"Published: {PUBLISHED['homology']}.", "",
              "![embedding projection](embedding_projection.png)", ""]  # fmt: skip
    return "\n".join(lines)


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
        metrics["perplexity"] = held_out_perplexity(model, args.shards, "valid", 16384,
                                                    args.crop_length)  # fmt: skip
    metrics["contacts"] = _contacts(model, args, data, out)
    summary, rows = _variants(model, data)
    write_results(str(out), "variants", summary, rows)
    metrics["variants"] = summary
    metrics["ss"] = _secondary(model, args, data)
    metrics["homology"] = _homology(model, data, out)
    with writing(out):
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (out / "report.md").write_text(_markdown(metrics))
    print(f"wrote {out / 'report.md'} and {out / 'metrics.json'}\n" + _summary(metrics))
    return 0


def _summary(metrics: dict) -> str:
    """The headline numbers, one line each."""
    c, v, s, h = (metrics[k] for k in ("contacts", "variants", "ss", "homology"))
    lines = []
    if "perplexity" in metrics:
        p = metrics["perplexity"]
        lines.append(f"held-out perplexity      {p['perplexity']:.3f}  (unigram baseline "
                     f"{p['unigram_perplexity']:.3f})")  # fmt: skip
    lines += [f"contacts long-range P@L  {c['mean_long_P@L']:.3f}  (random model of this size "
              f"{c['random_model_mean_long_P@L']:.3f}; published ESM-2 8M 0.159)",
              f"YAP1 DMS Spearman ρ      {v['spearman']:.3f}  (published ESM-1b mean |ρ| 0.459 "
              "over 41 assays)",
              f"CB513 Q3 (linear probe)  {s['q3']:.3f}  (commonest state always: "
              f"{s['majority_q3']:.3f})",
              f"SCOP fold Hit-10         {h['fold_hit10']:.3f}"]  # fmt: skip
    return "\n".join(lines)


def add_report(eval_sub) -> None:
    report = eval_sub.add_parser(
        "report",
        help="every evaluation on the bundled sets: report.md, metrics.json and the figures",
        description="Held-out perplexity (with --shards), contacts (regression fitted on 20 "
        "Pfam domains, scored on 12 others, beside a random model), one DMS ρ (YAP1), a Q3/Q8 "
        "linear probe (NetSurfP-2.0 → CB513), SCOP remote homology and an embedding "
        "projection, on one model.",
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
