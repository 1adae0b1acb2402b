"""Inference: engines, generate/chat, the OpenAI-compatible server, the vLLM launcher."""
