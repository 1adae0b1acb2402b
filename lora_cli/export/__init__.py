"""Export: merged models and GGUF / Ollama files."""
