"""`esmdist eval contacts | contacts-fit | ss-probe | homology`: what is measured against
structure — contact maps, secondary structure, SCOP folds."""

from __future__ import annotations

import argparse
from pathlib import Path

from esmdist.cli_eval.common import add_model_arguments, model_from_args, run_curve, write_results
from esmdist.eval.structure import read_structures

RANGES_SHOWN = ("short", "medium", "long")


def fitted_contacts(model, fit_on: list | None, chains: list) -> None:
    """Fit the regression on `fit_on` (disjoint from `chains`) and put it in the model."""
    from esmdist.eval.contact_fit import apply_regression, check_disjoint, fit_regression

    if fit_on:
        fitted = fit_regression(model, fit_on)
        check_disjoint(fitted, chains)
        apply_regression(model, fitted)


def contact_rows(model, chains: list, fit_on: list | None = None) -> list[dict]:
    from esmdist.eval.contacts import evaluate_chains

    fitted_contacts(model, fit_on, chains)
    return evaluate_chains(model, chains)


def _print_contacts(rows: list[dict]) -> None:
    from esmdist.eval.contacts import NO_PREDICTION, mean_metrics

    def cells(found: dict, prefix: str = "") -> str:
        if found[f"{prefix}long_P@L"] is None:
            return f"{NO_PREDICTION:>41}"
        return " ".join(f"{found[f'{prefix}{r}_P@L']:>13.3f}" for r in RANGES_SHOWN)

    print(f"{'structure':<28} {'L':>5} " + " ".join(f"{r + ' P@L':>13}" for r in RANGES_SHOWN))
    for row in rows:
        print(f"{row['structure']:<28} {row['length']:>5} {cells(row)}")
    means = mean_metrics(rows)
    print(f"{'mean':<28} {'':>5} {cells(means, 'mean_')}")
    print(f"{'random ranking (density)':<28} {'':>5} {cells(means, 'mean_random_')}")


def plot_chain_contacts(model, chains: list, out: str) -> list[Path]:
    """One PNG per chain: `out` for one chain, `{stem}_{chain}.png` beside it for several."""
    from esmdist.eval.contacts import predict_contacts
    from esmdist.eval.plot import plot_contacts

    target = Path(out)
    written = []
    for chain in chains:
        name = chain.name.replace(":", "_").replace(".", "_")
        path = target if len(chains) == 1 else target.with_name(f"{target.stem}_{name}.png")
        predicted = predict_contacts(model, chain.sequence)
        written.append(plot_contacts(predicted, chain.contacts, chain.name, path))
    return written


def _cmd_contacts(args: argparse.Namespace) -> int:
    from esmdist.eval.contacts import mean_metrics

    chains = read_structures(args.structures)
    fit_on = read_structures(args.fit) if args.fit else None
    if args.checkpoints:
        if not (fit_on or args.contact_regression):
            print("note: no --fit: each checkpoint's contact regression is used as stored "
                  "(an esmdist model's is fitted only by contacts-fit)")  # fmt: skip
        return run_curve(args, "contacts", lambda m: mean_metrics(contact_rows(m, chains, fit_on)),
                         [f"mean_{r}_P@L" for r in ("long", "medium", "short")],
                         {f"mean_{r}_P@L": f"mean_random_{r}_P@L" for r in RANGES_SHOWN})  # fmt: skip
    model = model_from_args(args)
    rows = contact_rows(model, chains, fit_on)
    _print_contacts(rows)
    if args.out:
        write_results(args.out, "contacts", {"model": args.model, **mean_metrics(rows)}, rows)
    if args.plot:
        print("plots: " + ", ".join(str(p) for p in plot_chain_contacts(model, chains, args.plot)))
    return 0


def _cmd_contacts_fit(args: argparse.Namespace) -> int:
    from esmdist.eval.contact_fit import (
        apply_regression,
        fit_regression,
        save_fitted_model,
        save_regression,
    )

    chains = read_structures(args.structures)
    model = model_from_args(args)
    fitted = fit_regression(model, chains, args.C)
    apply_regression(model, fitted)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [save_regression(fitted, out / "contact_regression.json")]
    written += save_fitted_model(model, out)
    nonzero = sum(1 for w in fitted.weight if w != 0)
    print(f"fitted on {len(chains)} structures: {nonzero} of {len(fitted.weight)} layer × head "
          f"weights non-zero (L1, C={args.C}); wrote " + ", ".join(map(str, written)))  # fmt: skip
    return 0


def probe_results(model, args: argparse.Namespace) -> dict:
    """Train (or load) the probe(s) and score them on the test file."""
    from esmdist.eval.embed import resolve_layers
    from esmdist.eval.secondary import Probe, read_netsurfp, score_probes, train_probes

    test = read_netsurfp(args.test, args.limit_test)
    if args.probe:
        loaded = [(path, Probe.load(path)) for path in args.probe]
        for path, probe in loaded:
            if len(probe.mean) != model.config.embed_dim:
                raise ValueError(f"{path}: a probe of {len(probe.mean)}-wide features, the "
                                 f"model's are {model.config.embed_dim}")  # fmt: skip
            if probe.layer != loaded[0][1].layer or probe.layer > model.config.num_layers:
                raise ValueError(f"{path}: a probe of layer {probe.layer}; give probes of one "
                                 f"layer of this {model.config.num_layers}-layer model")  # fmt: skip
        probes = {probe.states: probe for _, probe in loaded}
    else:
        layer = resolve_layers([args.layer], model.config.num_layers)[0]
        train = read_netsurfp(args.train, args.limit_train)
        probes = train_probes(model, train, layer, str(args.train), args.max_train_residues,
                              args.max_tokens)  # fmt: skip
    return {**score_probes(model, probes, test, args.max_tokens), "_probes": probes}


def _cmd_ss_probe(args: argparse.Namespace) -> int:
    if not (args.train or args.probe):
        raise ValueError("give --train (a labelled NetSurfP-2.0 CSV) or --probe (saved probes)")

    def evaluate(model) -> dict:
        found = probe_results(model, args)
        found.pop("_probes")
        return found

    if args.checkpoints:
        return run_curve(args, "ss_probe", evaluate, ["q3"], {"q3": "majority_q3"})
    found = probe_results(model_from_args(args), args)
    probes = found.pop("_probes")
    q8 = f"{found['q8']:.4f}" if "q8" in found else "n/a (the training labels are 3-state only)"
    print(f"{args.test}: Q3 {found['q3']:.4f}, Q8 {q8} over {found['residues']:,} residues")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for states, probe in probes.items():
            print(f"probe: {probe.save(out / f'ss{states}_probe.npz')}")
        rows = [{"metric": k, "value": v} for k, v in found.items()]
        write_results(args.out, "ss_probe", {"model": args.model, **found}, rows)
    return 0


def homology_results(model, fasta: str, layer: int, max_tokens: int):
    """(hit rates, the domains, their [N, D] mean embeddings)."""
    from esmdist.data.fasta import read_fasta
    from esmdist.eval.embed import mean_embeddings, resolve_layers
    from esmdist.eval.homology import hit_rates, read_scop_fasta

    domains = read_scop_fasta(read_fasta(fasta), fasta)
    layer = resolve_layers([layer], model.config.num_layers)[0]
    vectors = mean_embeddings(model, [d.sequence for d in domains], layer, max_tokens)
    found = {"domains": len(domains), "layer": layer, **hit_rates(domains, vectors)}
    return found, domains, vectors


def _cmd_homology(args: argparse.Namespace) -> int:
    found, _, _ = homology_results(model_from_args(args), args.fasta, args.layer, args.max_tokens)
    print(f"{args.fasta}: {found['domains']} domains, layer {found['layer']}")
    print(f"{'level':<12} {'queries':>8} {'Hit-1':>8} {'Hit-10':>8}")
    for level in ("superfamily", "fold"):
        print(f"{level:<12} {found[f'{level}_queries']:>8} {found[f'{level}_hit1']:>8.3f} "
              f"{found[f'{level}_hit10']:>8.3f}")  # fmt: skip
    if args.out:
        rows = [{"metric": k, "value": v} for k, v in found.items()]
        write_results(args.out, "homology", {"model": args.model, **found}, rows)
    return 0


def add_contacts(eval_sub) -> None:
    contacts = eval_sub.add_parser(
        "contacts",
        help="unsupervised contact precision on structures (P@L by range, as fair-esm)",
        description="Predict contacts from the attention maps and score them against each "
        "structure's Cβ–Cβ < 8 Å contacts (virtual Cβ): precision of the top L, L/2, L/5 pairs "
        "for short (6–11), medium (12–23) and long (≥ 24) separations, and fair-esm's AUC. "
        "The sequence is the chain's observed residues. A freshly pretrained model needs its "
        "contact regression fitted first: --fit, --contact-regression or contacts-fit.",
    )
    add_model_arguments(contacts, curve=True)
    contacts.add_argument("structures", nargs="+", metavar="FILE[:CHAIN]",
                          help=".pdb, .cif or .bcif (optionally .gz), or a directory of them; "
                          "CHAIN the author chain id (default: the first protein chain)")  # fmt: skip
    contacts.add_argument("--fit", nargs="+", metavar="FILE[:CHAIN]",
                          help="fit the contact regression on these structures first (disjoint "
                          "from the evaluated ones), as contacts-fit")  # fmt: skip
    contacts.add_argument("--contact-regression", metavar="FILE",
                          help="apply a fitted regression: contact_regression.json or a "
                          "fair-esm -contact-regression.pt")  # fmt: skip
    contacts.add_argument("--out", help="write contacts.json and contacts.csv here")
    contacts.add_argument("--plot", metavar="OUT.png",
                          help="predicted vs true contact map (one PNG per structure)")  # fmt: skip
    contacts.set_defaults(func=_cmd_contacts)

    fit = eval_sub.add_parser(
        "contacts-fit",
        help="fit the contact regression of a pretrained model (L1 logistic, as fair-esm)",
        description="Fit the logistic regression from every layer's and head's APC-corrected "
        "attention to contacts on ~20 training structures (L1, C=0.15, liblinear), and write "
        "it with the model: OUT/contact_regression.json, OUT/hf/ (esm.contact_head) and "
        "OUT/<arch>_fitted.pt with its -contact-regression.pt companion (fair-esm).",
    )
    add_model_arguments(fit)
    fit.add_argument(
        "structures",
        nargs="+",
        metavar="FILE[:CHAIN]",
        help="training structures (files or directories)",
    )
    fit.add_argument("--out", required=True, help="directory to write the fitted model to")
    fit.add_argument("--C", type=float, default=0.15, help="inverse L1 strength (%(default)s)")
    fit.set_defaults(func=_cmd_contacts_fit, contact_regression=None)


def add_ss_probe(eval_sub) -> None:
    probe = eval_sub.add_parser(
        "ss-probe",
        help="secondary structure (Q3/Q8) by a linear probe on frozen features",
        description="Train a logistic-regression probe on one layer's per-residue features of "
        "the NetSurfP-2.0 training chains and report Q3 (and Q8 where the training file has "
        "8-state labels) on CB513. Files: NetSurfP-2.0 CSV (input, dssp3[, dssp8], *_mask).",
    )
    add_model_arguments(probe, curve=True)
    probe.add_argument("--train", help="labelled training chains (e.g. "
                       "data/eval/ss/netsurfp2_train_2k.csv.gz)")  # fmt: skip
    probe.add_argument("--test", required=True,
                       help="chains to score (e.g. data/eval/ss/CB513_HHblits.csv.gz)")  # fmt: skip
    probe.add_argument("--probe", nargs="+", metavar="FILE.npz",
                       help="score saved probes instead of training (ss3_probe.npz …)")  # fmt: skip
    probe.add_argument("--layer", type=int, default=-1, help="layer of the features (-1: last)")
    probe.add_argument("--max-train-residues", type=int, default=200_000,
                       help="seeded sample of training residues (default: %(default)s)")  # fmt: skip
    probe.add_argument("--limit-train", type=int, help="use the first N training chains")
    probe.add_argument("--limit-test", type=int, help="score the first N test chains")
    probe.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch")
    probe.add_argument("--out", help="write ss_probe.json/.csv and the probes here")
    probe.set_defaults(func=_cmd_ss_probe)


def add_homology(eval_sub) -> None:
    homology = eval_sub.add_parser(
        "homology",
        help="SCOP remote homology by nearest embeddings (Hit-1/Hit-10, superfamily and fold)",
        description="Every domain queries the others by cosine similarity of mean embeddings; "
        "a superfamily-level hit shares the superfamily but not the family, a fold-level hit "
        "the fold but not the superfamily (the ESM-1b paper's setting).",
    )
    add_model_arguments(homology)
    homology.add_argument("--fasta", required=True,
                          help="ASTRAL/SCOPe FASTA (e.g. data/eval/scop/scop175_id40.fasta.gz)")  # fmt: skip
    homology.add_argument("--layer", type=int, default=-1, help="layer (-1: last)")
    homology.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch")
    homology.add_argument("--out", help="write homology.json/.csv here")
    homology.set_defaults(func=_cmd_homology)
