"""The in-process engine: scheduler, block pool, sequences, sampler, model runner, CUDA graphs."""
