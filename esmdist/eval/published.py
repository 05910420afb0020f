"""Published figures of the named sizes, matched to the model evaluated by its architecture and
shape, so that a report never sets an 8M figure beside a 650M model (or any figure beside a
size nobody published).

Sources (each figure is the source's own; none is on esmdist's bundled sets, which are smaller
and different — for scale only):
- contacts: fair-esm README, "Comparison to related works", column "Large valid": long-range
  (separation ≥ 24) top-L precision, the L1 regression fitted on 20 trRosetta structures
  (Rao et al. 2020). The bundled 12 Kortemme Pfam domains are another set.
- variants: ProteinGym v1 zero-shot substitutions, `Summary_performance_DMS_substitutions_
  Spearman.csv` (OATML-Markslab/ProteinGym @ f35cfd4), Average_Spearman over its 217 assays
  (ESM-1b's row uses Brandes et al.'s extensions for long sequences).
- secondary structure: fair-esm README (Dec 2020), ESM-1b linear projection Q8 on CB513
  trained on NetSurfP-2.0's whole training set.
No validation perplexity is published on a set esmdist can score: the papers' UniRef50
validation sets are not the user's held-out shards.
"""

from __future__ import annotations

from esmdist.model import ModelConfig
from esmdist.model.config import MODEL_SIZES

NONE = "no published value for this size"

FIGURES: dict[str, dict[str, float]] = {
    "esm2_8M": {"contacts_long_P@L": 0.159, "proteingym_spearman": 0.229},
    "esm2_35M": {"contacts_long_P@L": 0.288, "proteingym_spearman": 0.325},
    "esm2_150M": {"contacts_long_P@L": 0.422, "proteingym_spearman": 0.392},
    "esm2_650M": {"contacts_long_P@L": 0.501, "proteingym_spearman": 0.419},
    "esm2_3B": {"contacts_long_P@L": 0.527, "proteingym_spearman": 0.410},
    "esm2_15B": {"contacts_long_P@L": 0.545, "proteingym_spearman": 0.405},
    "esm1b_650M": {"contacts_long_P@L": 0.411, "proteingym_spearman": 0.399, "ss_q8": 0.716},
}
"""size name → figure: contacts_long_P@L (fair-esm "Large valid"), proteingym_spearman
(ProteinGym v1 mean ρ), ss_q8 (CB513, ESM-1b)."""

WHAT = {
    "contacts_long_P@L": "long-range P@L on fair-esm's large validation set (regression "
    "fitted on 20 trRosetta structures)",
    "proteingym_spearman": "mean Spearman ρ over ProteinGym v1's 217 substitution assays",
    "ss_q8": "CB513 Q8 of a linear probe trained on all of NetSurfP-2.0",
}


def size_of(config: ModelConfig) -> str | None:
    """The named size whose architecture and shape `config` has (None: a size of its own)."""
    for name, named in MODEL_SIZES.items():
        if name in FIGURES and (named.arch, named.num_layers, named.embed_dim,
                                named.attention_heads, named.vocab_size) == (
            config.arch, config.num_layers, config.embed_dim, config.attention_heads,
            config.vocab_size):  # fmt: skip
            return name
    return None


def published(config: ModelConfig, figure: str) -> str:
    """'published {size}: {value} ({what})', or that there is none for this size."""
    size = size_of(config)
    value = FIGURES.get(size or "", {}).get(figure)
    if value is None:
        return f"{NONE} ({WHAT[figure]})"
    return f"published {size}: {value:.3f} ({WHAT[figure]})"
