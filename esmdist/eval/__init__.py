"""Evaluation, the ESM-1b paper's measurements (docs/evaluation.md): masked-LM perplexity on a
held-out split, pseudo-perplexity of sequences, and the unigram baseline both are read against
(`perplexity.py`); unsupervised contact precision on structures (`contacts.py`, chains read by
`structure.py`) and the contact regression fitted for a new model (`contact_fit.py`); zero-shot
variant effects on deep mutational scans (`variants.py`); sequence embeddings to parquet
(`embed.py`); the secondary-structure linear probe (`secondary.py`); SCOP remote homology by
nearest embeddings (`homology.py`); every checkpoint of a run (`curve.py`); figures
(`plot.py`); models larger than the GPU by FSDP2 CPU offload (`offload.py`)."""
