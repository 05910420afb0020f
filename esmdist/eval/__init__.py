"""Evaluation: masked-LM perplexity on a held-out split, pseudo-perplexity of sequences, and the
unigram baseline both are read against (`perplexity.py`); unsupervised contact precision on
structures (`contacts.py`, chains read by `structure.py`); zero-shot variant effects on deep
mutational scans (`variants.py`); sequence embeddings to parquet (`embed.py`); evaluation of
models larger than the GPU with FSDP2 CPU offload (`offload.py`)."""
