"""Local models: tokenizer -> batcher -> backend, and the CPU layout they share."""
