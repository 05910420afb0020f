"""Evaluation: masked-LM perplexity on a held-out split, pseudo-perplexity of sequences, and the
unigram baseline both are read against (`perplexity.py`)."""
