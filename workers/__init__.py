"""The engine inside one worker: model, KV cache, scheduler, sampler, runner, worker actors."""
