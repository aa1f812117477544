"""Everything that runs inside one worker process.

- engine/: the in-process engine (scheduler, block pool, sequences, sampler, model runner,
  CUDA graphs); runs without Ray, which is how most tests drive it
- actors/: the Ray worker actors (prefill, decode, colocated) wrapping the engine, their
  output sender and KV endpoint
- model/: the Llama-family model, weights (safetensors, GGUF, tiny random), TP transform
- attention/: attention backends (Triton, torch) behind one interface
- kv_transfer/: KV senders and receivers (torch.distributed NCCL/gloo, ZMQ, CUDA IPC)
- text/: tokenizers and request text (chat templates, stop strings)
- bench/: the offline engine benchmark and its table
- config.py, protocol.py, errors.py: the types other packages import
"""
