"""The Ray worker actors (prefill, decode, colocated): thin wrappers around the engine."""
