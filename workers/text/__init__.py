"""Tokenizers (HF tokenizers, GGUF metadata) and request text (chat templates, stops)."""
