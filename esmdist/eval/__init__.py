"""Evaluation tools: perplexity (masked and pseudo-), contacts, variant effects, embeddings."""
