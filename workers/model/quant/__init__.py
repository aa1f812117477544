"""Quantized weights kept quantized on the device: the checkpoint formats (GPTQ, AWQ,
compressed-tensors INT8/FP8), the layouts the kernels read, and loading them into the model's
linear layers. See workers/model/quant/scheme.py for how a checkpoint says it is quantized."""
