"""`esmdist eval`: perplexity, pseudo-perplexity and contact precision of any model (a size
name, an esmdist checkpoint, a fair-esm file or a Hugging Face directory)."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from esmdist.model.config import MODEL_SIZES

RANGES_SHOWN = ("short", "medium", "long")


def _load_model(spec: str, seed: int, offload: bool = False):
    import torch

    from esmdist.model import ESM, build_model, model_config

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec in MODEL_SIZES and not offload:
        print(f"model: untrained '{spec}' (random init, seed {seed})")
        return build_model(model_config(spec)).eval().to(device)
    if spec in MODEL_SIZES:
        config = model_config(spec)
        state = build_model(config).state_dict()
    else:
        from esmdist.export import model_weights

        config, state = model_weights(spec)
    where = "host memory, run block by block on " if offload else ""
    print(f"model: {spec} ({config.arch}, {config.num_params():,} parameters) on {where}{device}")
    if offload:
        from esmdist.eval.offload import offloaded_model

        return offloaded_model(config, state)
    model = ESM(config)
    model.load_state_dict(state)
    return model.eval().to(device)


def _cmd_eval_pppl(args: argparse.Namespace) -> int:
    from esmdist.data.fasta import read_fasta
    from esmdist.eval.perplexity import pseudo_perplexity, unigram_perplexity

    if args.limit < 1:
        raise ValueError("--limit must be at least 1 (the number of sequences to score)")
    model = _load_model(args.model, args.seed, args.offload)
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


def _cmd_eval_perplexity(args: argparse.Namespace) -> int:
    from esmdist.data.stream import DataConfig, ShardSet, validation_batches
    from esmdist.eval.perplexity import masked_perplexity, unigram_perplexity

    model = _load_model(args.model, args.seed, args.offload)
    config = DataConfig(path=args.shards, max_tokens=args.max_tokens,
                        crop_length=args.crop_length, num_workers=0)  # fmt: skip
    held_out = ShardSet.from_directory(args.shards, args.split)
    train = ShardSet.from_directory(args.shards, "train")
    ppl, count = masked_perplexity(model, validation_batches(held_out, config))

    def sequences(shards: ShardSet):
        for shard in range(len(shards.urls)):
            for _, seqs in shards.read(shard):
                yield from seqs

    baseline = unigram_perplexity(sequences(train), sequences(held_out))
    print(f"{args.split}: masked-LM perplexity {ppl:.3f} over {count:,} masked residues of "
          f"{held_out.total:,} samples (unigram baseline fitted on train: {baseline:.3f})")  # fmt: skip
    return 0


def _write_results(out: str, name: str, summary: dict, rows: list[dict]) -> None:
    """`out/{name}.json` (the summary and every row) and `out/{name}.csv` (the rows)."""
    import csv
    import json

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    with open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {folder / f'{name}.json'}, {folder / f'{name}.csv'}")


def _cmd_eval_contacts(args: argparse.Namespace) -> int:

    from esmdist.eval.contacts import evaluate_chains
    from esmdist.eval.structure import read_chain

    chains = [read_chain(*spec.rsplit(":", 1)) if ":" in spec else read_chain(spec)
              for spec in args.structures]  # fmt: skip
    rows = evaluate_chains(_load_model(args.model, args.seed, args.offload), chains)
    print(f"{'structure':<24} {'L':>5} " + " ".join(f"{r + ' P@L':>13}" for r in RANGES_SHOWN))
    for row in rows:
        print(f"{row['structure']:<24} {row['length']:>5} "
              + " ".join(f"{row[f'{r}_P@L']:>13.3f}" for r in RANGES_SHOWN))  # fmt: skip
    if args.out:
        _write_results(args.out, "contacts", {"model": args.model}, rows)
    return 0


def _cmd_eval_variants(args: argparse.Namespace) -> int:

    from esmdist.data.fasta import read_fasta
    from esmdist.eval.variants import read_dms, score_mutants, spearman

    source = Path(args.sequence)
    sequence = next(iter(read_fasta(args.sequence))).sequence if source.is_file() else args.sequence
    codes, mutants, measured = read_dms(args.dms, args.mutant_column, args.score_column,
                                        sequence, args.offset)  # fmt: skip
    model = _load_model(args.model, args.seed, args.offload)
    predicted = score_mutants(model, sequence, mutants, args.scoring)
    rho = spearman(predicted, measured)
    print(f"{args.dms}: {len(codes):,} variants, {args.scoring}: Spearman ρ = {rho:.4f}")
    if args.out:
        summary = {"model": args.model, "dms": args.dms, "scoring": args.scoring,
                   "variants": len(codes), "spearman": rho}  # fmt: skip
        rows = [{"mutant": code, args.score_column: value, "predicted": score} for code, value,
                score in zip(codes, measured.tolist(), predicted.tolist(), strict=True)]  # fmt: skip
        _write_results(args.out, "variants", summary, rows)
    return 0


def _cmd_eval_embed(args: argparse.Namespace) -> int:
    from esmdist.data.fasta import read_fasta
    from esmdist.eval.embed import embed_fasta, resolve_layers

    model = _load_model(args.model, args.seed, args.offload)
    layers = resolve_layers(args.layers, model.config.num_layers)
    report = embed_fasta(model, read_fasta(args.fasta), args.out, layers, args.per_residue,
                         args.max_tokens)  # fmt: skip
    cut = f"; {report.truncated:,} cut to the model's window" if report.truncated else ""
    print(f"{args.out}: {report.sequences:,} sequences, layers {layers}{cut}")
    return 0


def add_model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", required=True,
                         help=f"a size name for an untrained model ({', '.join(MODEL_SIZES)}), "
                         "an esmdist checkpoint, a fair-esm .pt file or a Hugging Face directory")  # fmt: skip
    command.add_argument("--seed", type=int, default=0, help="seed of an untrained model")
    command.add_argument("--offload", action="store_true",
                         help="keep the parameters in host memory and run block by block "
                         "(FSDP2 CPU offload): for models larger than the GPU, e.g. ESM-2 15B")  # fmt: skip


def _add_perplexities(eval_sub) -> None:
    perplexity = eval_sub.add_parser(
        "perplexity",
        help="masked-LM perplexity on a held-out split of a sharded dataset",
        description="Score the validation stream (fixed masks: comparable across runs) of a "
        "sharded dataset, next to the unigram perplexity fitted on its train split.",
    )
    add_model_arguments(perplexity)
    perplexity.add_argument("--shards", required=True, help="directory written by esmdist shard")
    perplexity.add_argument("--split", default="valid", help="held-out split (default: valid)")
    perplexity.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch")
    perplexity.add_argument("--crop-length", type=int, default=1024,
                            help="longest sequence in tokens (match the run's data.crop_length "
                            "to compare with its logged validation perplexity)")  # fmt: skip
    perplexity.set_defaults(func=_cmd_eval_perplexity)

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
    pppl.set_defaults(func=_cmd_eval_pppl)


def _add_contacts(eval_sub) -> None:
    contacts = eval_sub.add_parser(
        "contacts",
        help="unsupervised contact precision on structures (P@L by range, as fair-esm)",
        description="Predict contacts from the attention maps and score them against each "
        "structure's Cβ–Cβ < 8 Å contacts (virtual Cβ): precision of the top L, L/2, L/5 pairs "
        "for short (6–11), medium (12–23) and long (≥ 24) separations, and fair-esm's AUC. "
        "The sequence is the chain's observed residues. docs: esmdist/eval/contacts.py.",
    )
    add_model_arguments(contacts)
    contacts.add_argument("structures", nargs="+", metavar="FILE[:CHAIN]",
                          help=".pdb, .cif or .bcif; CHAIN the author chain id (default: the "
                          "first protein chain)")  # fmt: skip
    contacts.add_argument("--out", help="write contacts.json and contacts.csv here")
    contacts.set_defaults(func=_cmd_eval_contacts)


def _add_variants(eval_sub) -> None:
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
    variants.set_defaults(func=_cmd_eval_variants)


def _add_embed(eval_sub) -> None:
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
    embed.set_defaults(func=_cmd_eval_embed)


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


def add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a model")
    eval_sub = evaluate.add_subparsers(dest="metric", required=True)
    for add in (_add_perplexities, _add_contacts, _add_variants, _add_embed):
        add(eval_sub)
