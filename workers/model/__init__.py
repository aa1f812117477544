"""The decoder model: config parsed from HF config.json, layers, and the Llama-family model."""
