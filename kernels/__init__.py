"""Triton kernels, each beside its plain-torch reference. Imports only torch and triton.

- flash_prefill: varlen causal flash attention reading K/V through block tables (split-KV
  when few query blocks cannot fill the GPU)
- paged_decode: split-KV decode attention for 1..8 query tokens per sequence
- attention_tile: the online-softmax KV tile loop both attention kernels share, and the
  split-KV store and combine (log-sum-exp merge) both use
- attention_ref: the torch reference of paged causal attention
- cache_write: scatter new K/V into cache slots (slot_mapping), quantizing for an fp8 cache
- kv_quant: the fp8 (e4m3) KV cache format: per-layer K/V scales, torch quantize/dequantize
- kv_pack: gather / scatter a sequence's blocks to / from one contiguous transfer buffer
- quant_w4a16, quant_w8a16: matmuls with 4-bit (grouped) / int8 (per-channel) weights kept
  quantized, split-K at decode sizes (quant_split_k); quant_fp8: FP8 weights on the tensor
  cores with per-row activation quantization
- rmsnorm, rotary, activation: fused residual+RMSNorm, in-place RoPE, SiLU-and-multiply
- bench: `python -m kernels.bench.bench_kernels` on a GPU; bench_prefix_attention: split-KV
  prefill of a short tail after a cached prefix vs SDPA
"""
