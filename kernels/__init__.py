"""Triton kernels, each beside its plain-torch reference. Imports only torch and triton."""
