"""Models: loading base + tokenizer + adapters, adapter methods and targets, wrapping."""
