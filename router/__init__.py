"""The OpenAI-compatible HTTP gateway and the Router actor with its routing policies."""
