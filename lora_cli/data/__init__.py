"""Data: sources and row shapes, prompt templates, tokenised examples, the cache, batch layout."""
