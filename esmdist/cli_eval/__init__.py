"""`esmdist eval …` and `esmdist plot`: the ESM-1b paper's measurements on any model — a size
name, an esmdist checkpoint, a fair-esm file or a Hugging Face directory. Sequence commands in
`sequence.py`, structure commands in `structure.py`, the combined report in `report.py`."""

from esmdist.cli_eval.report import add_plot, add_report
from esmdist.cli_eval.sequence import add_embed, add_perplexities, add_variants
from esmdist.cli_eval.structure import add_contacts, add_homology, add_ss_probe


def add_eval(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a model (docs/evaluation.md)")
    eval_sub = evaluate.add_subparsers(dest="metric", required=True)
    for add in (add_perplexities, add_contacts, add_variants, add_embed, add_ss_probe,
                add_homology, add_report):  # fmt: skip
        add(eval_sub)


__all__ = ["add_eval", "add_plot"]
