"""Speculative decoding: proposers (n-gram, draft model, Medusa heads), verification of their
drafts in one target forward with exact rejection sampling, and the engine's hooks."""
