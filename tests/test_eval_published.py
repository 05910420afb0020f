"""Published figures are matched to the model evaluated: by architecture and shape, never an
8M figure beside another size (the report cited "published ESM-2 8M 0.159" for every model)."""

from __future__ import annotations

from dataclasses import replace

from esmdist.eval.published import FIGURES, NONE, published, size_of
from esmdist.model import model_config
from esmdist.model.config import MODEL_SIZES


def test_each_named_size_gets_its_own_figures():
    for name in MODEL_SIZES:
        config = model_config(name)
        assert size_of(config) == (name if name in FIGURES else None)
    assert published(model_config("esm2_650M"), "contacts_long_P@L").startswith(
        "published esm2_650M: 0.501 (long-range P@L on fair-esm's large validation set"
    )
    assert "esm2_8M: 0.229" in published(model_config("esm2_8M"), "proteingym_spearman")
    assert "esm1b_650M: 0.716" in published(model_config("esm1b_650M"), "ss_q8")


def test_other_shapes_and_missing_figures_say_there_is_none():
    assert published(model_config("debug"), "contacts_long_P@L").startswith(NONE)
    wider = replace(model_config("esm2_150M"), num_layers=29)
    assert size_of(wider) is None and published(wider, "proteingym_spearman").startswith(NONE)
    assert published(model_config("esm2_3B"), "ss_q8").startswith(NONE)
