"""Regenerate docs/evaluation.md's tables and figures from the main job's results.

    bash scripts/demo.sh && python scripts/eval_docs.py out/demo

Every block between `<!-- eval_docs: NAME -->` and `<!-- /eval_docs: NAME -->` in
docs/evaluation.md is rewritten from out/demo/report/ (metrics.json, contacts.json and the
curves' JSON), and the report's figures are copied to docs/figures/. Anything outside the
blocks is left as written.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "evaluation.md"
FIGURES = ("contact_map.png", "contacts_curve.png", "embedding_projection.png",
           "perplexity_curve.png", "variants.png")  # fmt: skip


def _number(value) -> str:
    return "no prediction" if value is None else f"{value:.3f}"


def contacts_table(report: Path) -> str:
    rows = json.loads((report / "contacts.json").read_text())
    lines = [f"{'structure':<28} {'L':>5} {'long P@L':>14} {'random ranking':>15}"]
    for row in rows["rows"][:3]:
        lines.append(f"{row['structure']:<28} {row['length']:>5} "
                     f"{_number(row['long_P@L']):>14} {row['random_long_P@L']:>15.3f}")  # fmt: skip
    lines.append("…")
    means = json.loads((report / "metrics.json").read_text())["contacts"]
    lines.append(f"{'mean (12 structures)':<28} {'':>5} {_number(means['mean_long_P@L']):>14} "
                 f"{means['mean_random_long_P@L']:>15.3f}")  # fmt: skip
    return "\n".join(lines)


def curve_table(report: Path) -> str:
    perplexity = json.loads((report / "perplexity_curve.json").read_text())["rows"]
    contacts = {
        r["step"]: r for r in json.loads((report / "contacts_curve.json").read_text())["rows"]
    }
    lines = [
        f"{'step':>6} {'perplexity':>11} {'unigram':>8} {'long P@L':>14} {'random ranking':>15}"
    ]
    for row in perplexity:
        found = contacts.get(row["step"], {})
        lines.append(f"{row['step']:>6} {row['perplexity']:>11.3f} {row['unigram_perplexity']:>8.3f} "
                     f"{_number(found.get('mean_long_P@L')):>14} "
                     f"{found.get('mean_random_long_P@L', float('nan')):>15.3f}")  # fmt: skip
    return "\n".join(lines)


def homology_table(report: Path) -> str:
    found = json.loads((report / "metrics.json").read_text())["homology"]
    lines = [f"{'level':<12} {'queries':>8} {'Hit-1':>8} {'Hit-10':>8} {'untrained Hit-10':>17}"]
    for level in ("superfamily", "fold"):
        lines.append(f"{level:<12} {found[f'{level}_queries']:>8} {found[f'{level}_hit1']:>8.3f} "
                     f"{found[f'{level}_hit10']:>8.3f} {found[f'random_model_{level}_hit10']:>17.3f}")  # fmt: skip
    return "\n".join(lines)


def summary(report: Path) -> str:
    sys.path.insert(0, str(REPO))
    from esmdist.cli_eval.report import headline_summary

    return headline_summary(json.loads((report / "metrics.json").read_text()))


def main(demo: str) -> int:
    report = Path(demo) / "report"
    if not (report / "metrics.json").is_file():
        print(f"{report}: no metrics.json (run bash scripts/demo.sh first)", file=sys.stderr)
        return 2
    blocks = {"summary": summary(report), "contacts": contacts_table(report),
              "curve": curve_table(report), "homology": homology_table(report)}  # fmt: skip
    text = DOC.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- eval_docs: {name} -->\n```\n).*?(```\n<!-- /eval_docs: {name} -->)",
                             re.DOTALL)  # fmt: skip
        text, count = pattern.subn(lambda m, b=body: m.group(1) + b + "\n" + m.group(2), text)
        if count != 1:
            print(f"{DOC}: no block '{name}' to fill", file=sys.stderr)
            return 1
    DOC.write_text(text)
    for figure in FIGURES:
        shutil.copy(report / figure, REPO / "docs" / "figures" / figure)
    print(f"rewrote {DOC} ({', '.join(blocks)}) and docs/figures/ from {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
