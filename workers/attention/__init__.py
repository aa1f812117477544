"""Attention behind one small interface; backends: plain torch (reference) and Triton."""
