"""`esmdist eval perplexity | pppl | variants | embed`: what is measured on sequences alone."""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

from esmdist.cli_eval.common import add_model_arguments, model_from_args, run_curve, write_results


def held_out_perplexity(model, shards: str, split: str, max_tokens: int,
                        crop_length: int) -> dict:  # fmt: skip
    """Masked-LM perplexity of the split's validation stream and the unigram baseline."""
    from esmdist.data.stream import DataConfig, ShardSet, validation_batches
    from esmdist.eval.perplexity import masked_perplexity, unigram_perplexity

    config = DataConfig(path=shards, max_tokens=max_tokens, crop_length=crop_length,
                        num_workers=0)  # fmt: skip
    held_out = ShardSet.from_directory(shards, split)
    train = ShardSet.from_directory(shards, "train")
    ppl, count = masked_perplexity(model, validation_batches(held_out, config))

    def sequences(shard_set: ShardSet):
        for shard in range(len(shard_set.urls)):
            for _, seqs in shard_set.read(shard):
                yield from seqs

    baseline = unigram_perplexity(sequences(train), sequences(held_out))
    return {"perplexity": ppl, "masked_residues": count, "samples": held_out.total,
            "unigram_perplexity": baseline}  # fmt: skip


def _cmd_perplexity(args: argparse.Namespace) -> int:
    def evaluate(model) -> dict:
        return held_out_perplexity(model, args.shards, args.split, args.max_tokens,
                                   args.crop_length)  # fmt: skip

    if args.checkpoints:
        return run_curve(args, "perplexity", evaluate, ["perplexity"],
                         {"perplexity": "unigram_perplexity"})  # fmt: skip
    found = evaluate(model_from_args(args))
    print(f"{args.split}: masked-LM perplexity {found['perplexity']:.3f} over "
          f"{found['masked_residues']:,} masked residues of {found['samples']:,} samples "
          f"(unigram baseline fitted on train: {found['unigram_perplexity']:.3f})")  # fmt: skip
    return 0


def _cmd_pppl(args: argparse.Namespace) -> int:
    from esmdist.data.fasta import read_fasta
    from esmdist.eval.perplexity import pseudo_perplexity, unigram_perplexity

    if args.limit < 1:
        raise ValueError("--limit must be at least 1 (the number of sequences to score)")
    model = model_from_args(args)
    records = list(itertools.islice(read_fasta(args.fasta), args.limit))
    if not records:
        raise ValueError(f"{args.fasta}: no sequences to score")
    print(f"scoring the first {len(records)} sequence(s) of {args.fasta} (--limit {args.limit})")
    scores = []
    for record in records:
        ppl = pseudo_perplexity(model, record.sequence)
        scores.append(ppl)
        print(f"{record.id}\tlength={len(record.sequence)}\tpseudo_perplexity={ppl:.3f}")
    baseline = unigram_perplexity((r.sequence for r in read_fasta(args.fasta)),
                                  (r.sequence for r in records))  # fmt: skip
    mean = sum(scores) / len(scores)
    print(f"mean pseudo-perplexity over {len(scores)} sequences: {mean:.3f} "
          f"(unigram baseline {baseline:.3f}; uniform over 20 residues: 20.000)")  # fmt: skip
    return 0


def dms_spearman(model, dms: str, sequence: str, score_column: str, table: tuple,
                 scoring: str = "masked-marginals") -> tuple[dict, list[dict]]:  # fmt: skip
    """(summary with Spearman's ρ, one row per variant) of the DMS table `read_dms` read."""
    from esmdist.eval.variants import random_spearman, score_mutants, spearman

    codes, mutants, measured = table
    predicted = score_mutants(model, sequence, mutants, scoring)
    summary = {"dms": dms, "scoring": scoring, "variants": len(codes),
               "spearman": spearman(predicted, measured), **random_spearman(measured)}  # fmt: skip
    rows = [{"mutant": code, score_column: value, "predicted": score} for code, value, score
            in zip(codes, measured.tolist(), predicted.tolist(), strict=True)]  # fmt: skip
    return summary, rows


def plot_dms(summary: dict, rows: list[dict], score_column: str, out: str | Path) -> Path:
    """The predicted-vs-measured scatter of `dms_spearman`'s rows."""
    import numpy as np

    from esmdist.eval.plot import plot_variants

    predicted = np.array([row["predicted"] for row in rows])
    measured = np.array([row[score_column] for row in rows])
    title = f"{Path(summary['dms']).parent.name or summary['dms']}: {summary['scoring']}"
    return plot_variants(predicted, measured, summary["spearman"], title, out)


def wild_type(sequence: str) -> str:
    """The first record of a FASTA file, or the argument itself: a sequence of residue letters
    (fair-esm's README passes BLAT's 263 residues so — longer than a file name may be)."""
    from esmdist import alphabet
    from esmdist.data.fasta import read_fasta

    letters = "".join(c for c in alphabet.RESIDUE_SYMBOLS if c.isalpha())
    if os.path.isfile(sequence):  # False, not OSError, for a name too long to be a file's
        return next(iter(read_fasta(sequence))).sequence
    if sequence and set(sequence) <= set(letters):
        return sequence
    shown = (
        repr(sequence)
        if len(sequence) <= 300
        else f"{sequence[:60]!r}… ({len(sequence)} characters)"
    )
    raise ValueError(f"--sequence {shown}: no such FASTA file, and not a protein sequence "
                     f"(residue letters {letters} only)")  # fmt: skip


def _cmd_variants(args: argparse.Namespace) -> int:
    from esmdist.eval.variants import read_dms

    sequence = wild_type(args.sequence)
    # Read (and checked) before the model is loaded: a bad table fails in a second.
    table = read_dms(args.dms, args.mutant_column, args.score_column, sequence, args.offset)
    summary, rows = dms_spearman(model_from_args(args), args.dms, sequence, args.score_column,
                                 table, args.scoring)  # fmt: skip
    print(f"{args.dms}: {summary['variants']:,} variants, {args.scoring}: "
          f"Spearman ρ = {summary['spearman']:.4f} (random scores: |ρ| "
          f"{summary['random_abs_spearman_mean']:.3f} on average, 95% below "
          f"{summary['random_abs_spearman_p95']:.3f})")  # fmt: skip
    if args.out:
        write_results(args.out, "variants", {"model": args.model, **summary}, rows)
    if args.plot:
        print(f"plot: {plot_dms(summary, rows, args.score_column, args.plot)}")
    return 0


def plot_embeddings(parquet: str, fasta: str, layer: int, label_regex: str | None, out: str,
                    limit: int = 20_000) -> Path:  # fmt: skip
    """PCA of (a seeded sample of at most `limit` of) the mean vectors written to `parquet`,
    coloured by the first group of `label_regex` in each record's FASTA header."""
    import re

    import numpy as np

    from esmdist.data.fasta import read_fasta
    from esmdist.data.format import read_parquet
    from esmdist.eval.plot import plot_projection

    table = read_parquet(parquet, columns=["id", f"mean_{layer}"])
    rows = np.random.default_rng(0).permutation(table.num_rows)[:limit]
    ids = table.column("id").take(rows).to_pylist()
    vectors = np.stack(table.column(f"mean_{layer}").take(rows).to_numpy(zero_copy_only=False))
    labels = None
    if label_regex:
        pattern, wanted, labels_of = re.compile(label_regex), set(ids), {}
        for record in read_fasta(fasta):
            if record.id in wanted:
                found = pattern.search(record.header)
                labels_of[record.id] = (found.group(1) if found and found.groups()
                                        else found.group(0) if found else "no match")  # fmt: skip
        labels = [labels_of[i] for i in ids]
    return plot_projection(vectors, labels, f"{Path(fasta).name}: layer {layer}, PCA", out)


def _cmd_embed(args: argparse.Namespace) -> int:
    from esmdist.data.fasta import read_fasta
    from esmdist.eval.embed import embed_fasta, resolve_layers

    model = model_from_args(args)
    layers = resolve_layers(args.layers, model.config.num_layers)
    report = embed_fasta(model, read_fasta(args.fasta), args.out, layers, args.per_residue,
                         args.max_tokens)  # fmt: skip
    cut = f"; {report.truncated:,} cut to the model's window" if report.truncated else ""
    print(f"{args.out}: {report.sequences:,} sequences, layers {layers}{cut}")
    if args.plot:
        figure = plot_embeddings(args.out, args.fasta, layers[-1], args.label_regex, args.plot)
        print(f"plot: {figure}")
    return 0


def add_perplexities(eval_sub) -> None:
    perplexity = eval_sub.add_parser(
        "perplexity",
        help="masked-LM perplexity on a held-out split of a sharded dataset",
        description="Score the validation stream (fixed masks: comparable across runs) of a "
        "sharded dataset, next to the unigram perplexity fitted on its train split.",
    )
    add_model_arguments(perplexity, curve=True)
    perplexity.add_argument("--shards", required=True, help="directory written by esmdist shard")
    perplexity.add_argument("--split", default="valid", help="held-out split (default: valid)")
    perplexity.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch")
    perplexity.add_argument("--crop-length", type=int, default=1024,
                            help="longest sequence in tokens (match the run's data.crop_length "
                            "to compare with its logged validation perplexity)")  # fmt: skip
    perplexity.add_argument("--out", help="with --checkpoints: where the curve goes")
    perplexity.set_defaults(func=_cmd_perplexity)

    pppl = eval_sub.add_parser(
        "pppl",
        help="per-sequence pseudo-perplexity on a FASTA file",
        description="Mask every residue in turn and report exp(mean NLL) per sequence, with the "
        "unigram (residue-frequency) perplexity of the same sequences as the baseline.",
    )
    add_model_arguments(pppl)
    pppl.add_argument("--fasta", required=True, help="FASTA file (.gz/.zst, local or s3://)")
    pppl.add_argument("--limit", type=int, default=16,
                      help="score the first N sequences of the file (default: %(default)s; one "
                      "forward pass per residue each)")  # fmt: skip
    pppl.set_defaults(func=_cmd_pppl)


def add_variants(eval_sub) -> None:
    variants = eval_sub.add_parser(
        "variants",
        help="zero-shot variant effects on a DMS table (Spearman ρ, as ESM-1v)",
        description="Score every mutant of a deep mutational scan (A23V, or A23V:G45L added up) "
        "with the model and report Spearman's ρ against the measured column. Scorings: "
        "masked-marginals (ESM-1v's default), wt-marginals, pseudo-likelihood.",
    )
    add_model_arguments(variants)
    variants.add_argument("--dms", required=True, help="CSV with a mutant and a score column")
    variants.add_argument("--sequence", required=True,
                          help="the wild type: a FASTA file (first record) or the sequence")  # fmt: skip
    variants.add_argument("--score-column", required=True, help="the measured fitness column")
    variants.add_argument("--mutant-column", default="mutant", help="default: %(default)s")
    variants.add_argument("--offset", type=int, default=1,
                          help="number of the sequence's first residue in the mutant codes "
                          "(default: %(default)s)")  # fmt: skip
    variants.add_argument("--scoring", default="masked-marginals",
                          choices=["masked-marginals", "wt-marginals", "pseudo-likelihood"])  # fmt: skip
    variants.add_argument("--out", help="write variants.json and variants.csv here")
    variants.add_argument("--plot", metavar="OUT.png",
                          help="predicted against measured, one point per variant")  # fmt: skip
    variants.set_defaults(func=_cmd_variants)


def add_embed(eval_sub) -> None:
    embed = eval_sub.add_parser(
        "embed",
        help="per-sequence (and per-residue) representations of a FASTA to parquet",
        description="Mean representation over each sequence's residues (specials excluded, as "
        "fair-esm's mean_representations) of the chosen layers, written to a parquet file in "
        "length-sorted batches by tokens: columns id, length, mean_<layer> (and "
        "residues_<layer>), rows in the FASTA's order.",
    )
    add_model_arguments(embed)
    embed.add_argument("--fasta", required=True, help="FASTA file (.gz/.zst, local or s3://)")
    embed.add_argument("--out", required=True, help="the parquet file to write")
    embed.add_argument("--layers", type=int, nargs="+", default=[-1],
                       help="layer numbers, 0 the embeddings, -1 the last (default: -1)")  # fmt: skip
    embed.add_argument("--per-residue", action="store_true", help="also every residue's vector")
    embed.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch")
    embed.add_argument("--plot", metavar="OUT.png",
                       help="also plot a PCA of the last chosen layer's mean vectors (at most "
                       "20,000, a seeded sample)")  # fmt: skip
    embed.add_argument("--label-regex",
                       help="with --plot: colour by the first group of this regex in each FASTA "
                       r"header, e.g. ' ([a-g])\.' for the SCOP class of ASTRAL headers")  # fmt: skip
    embed.set_defaults(func=_cmd_embed)
