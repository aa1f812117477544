"""TP=2 and PP=2 on two GPUs over NCCL (the worker group's own join_group and step
broadcast, one process per rank): decode steps replayed from CUDA graphs with TP's
all-reduces captured inside give the single-GPU logits (float32, tiny model).

Self-contained (no fixtures from tests/conftest.py, no Ray):
`pytest -m gpu --confcutdir=tests/gpu tests/gpu/test_parallel_gpu.py` on a 2-GPU machine.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]

BLOCK = 16
RANKS_TIMEOUT_S = 120


def _steps():
    from workers.engine.step_input import StepInput

    prompts = [[5 + (i * 7 + j) % 400 for j in range(9 + 5 * i)] for i in range(3)]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(3)]

    def step(tokens_per_seq, new_per_seq):
        ids, pos, slots, starts, lens, logits = [], [], [], [0], [], []
        for tokens, new, table in zip(tokens_per_seq, new_per_seq, tables, strict=True):
            for p in range(len(tokens) - new, len(tokens)):
                ids.append(tokens[p])
                pos.append(p)
                slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
            starts.append(len(ids))
            lens.append(len(tokens))
            logits.append(len(ids) - 1)
        return StepInput([str(i) for i in range(3)], ids, pos, slots, starts, lens,
                         [list(t) for t in tables], logits)

    out = [step(prompts, [len(p) for p in prompts])]
    for k in range(1, 4):  # decode-only steps: graphed
        grown = [p + [11 * k + i for i in range(k)] for p in prompts]
        out.append(step(grown, [1] * 3))
    return out


def _config(model_dir: str, device: str, tp: int, pp: int):
    from workers.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(model=model_dir, device=device, dtype="float32", tp_size=tp,
                        pp_size=pp, max_model_len=256,
                        cache=CacheConfig(block_size=BLOCK, num_blocks=16),
                        scheduler=SchedulerConfig(max_num_seqs=4))


def _pipelined(driver, steps) -> list:
    """Rank 0 of a pipeline with two micro-batches in flight (the engine's order: submit,
    submit, collect, submit, collect, ...); logits in step order."""
    logits = []
    driver.submit(steps[0])
    for step in steps[1:]:
        driver.submit(step)
        logits.append(driver.collect().cpu())
    logits.append(driver.collect().cpu())
    return logits


def _rank(rank: int, model_dir: str, tp: int, pp: int, port: int, out: str,
          micro: bool) -> None:
    from torch.distributed import TCPStore

    from workers.actors.rank_group import Rendezvous, group_backend, join_group, leave_group
    from workers.actors.step_broadcast import StepBroadcast
    from workers.engine.model_runner import ModelRunner
    from workers.engine.stage_driver import StageDriver

    config = _config(model_dir, f"cuda:{rank}", tp, pp)
    store = TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=120),
                     wait_for_workers=False)
    backend = group_backend(torch.device(config.device))  # NCCL for CUDA tensors
    parallel = join_group(config, Rendezvous("127.0.0.1", port, 2, backend), rank, store)
    channel = StepBroadcast()
    runner = ModelRunner(config, parallel)
    if rank == 0:
        driver = StageDriver(runner, channel)
        if micro:
            logits = _pipelined(driver, _steps())
        else:
            logits = [driver.execute(step).cpu() for step in _steps()]
        channel.stop()
        torch.save({"logits": logits, "graphs": runner.graph_runner is not None}, out)
    else:
        while (step := channel.recv()) is not None:
            runner.run_pipeline(step)
    runner.close()  # captured NCCL calls would keep destroy_process_group waiting
    leave_group()


@pytest.mark.parametrize(("tp", "pp", "micro"), [(2, 1, False), (1, 2, False), (1, 2, True)],
                         ids=["tp2-graphs", "pp2", "pp2-microbatches"])
def test_two_gpu_group_matches_one_gpu(tp, pp, micro):
    """pp2-microbatches: the driver keeps two steps in flight over NCCL (stage 0 runs step
    n + 1 while stage 1 runs n); the steps' inputs are known ahead, so this is the engine's
    order without sampling."""
    from workers.engine.model_runner import ModelRunner
    from workers.model.tiny_model import make_variant

    model_dir = str(make_variant(tempfile.mkdtemp(prefix="kvrelay-gpu-tp-"), "llama"))
    single = ModelRunner(_config(model_dir, "cuda:0", 1, 1))
    expected = [single.execute(step).cpu() for step in _steps()]
    assert single.graph_runner is not None
    del single
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "rank0.pt")
    ranks = mp.start_processes(_rank, args=(model_dir, tp, pp, port, out, micro), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while not ranks.join(timeout=1.0):
        if time.monotonic() > deadline:  # ranks out of lockstep wait in NCCL forever
            for process in ranks.processes:
                process.kill()
            where = ("in teardown, after every step" if os.path.exists(out)
                     else "before rank 0 finished its steps")
            pytest.fail(f"tp={tp} pp={pp}: the two ranks did not finish in {RANKS_TIMEOUT_S} s "
                        f"(stuck {where})")
    result = torch.load(out)
    assert result["graphs"] == (pp == 1)  # TP keeps CUDA graphs; a PP stage runs eager
    for got, want in zip(result["logits"], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_graphs_of_a_runner_whose_device_is_not_the_current_one():
    """A process that touched another GPU (the in-process KV pair tests bind cuda:1) keeps
    that device current: a runner on cuda:0 must still capture its CUDA graphs on cuda:0
    (torch.cuda.graph captures the current device's stream; Triton launches there too), or
    its graphs capture nothing and replay stale logits."""
    from dataclasses import replace

    from workers.engine.model_runner import ModelRunner
    from workers.model.tiny_model import make_variant

    model_dir = str(make_variant(tempfile.mkdtemp(prefix="kvrelay-gpu-dev-"), "llama"))
    eager = ModelRunner(replace(_config(model_dir, "cuda:0", 1, 1), enforce_eager=True))
    expected = [eager.execute(step).cpu() for step in _steps()]
    del eager
    previous = torch.cuda.current_device()
    torch.cuda.set_device(1)
    try:
        graphed = ModelRunner(_config(model_dir, "cuda:0", 1, 1))
        assert graphed.graph_runner is not None
        got = [graphed.execute(step).cpu() for step in _steps()]
    finally:
        torch.cuda.set_device(previous)
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g, want, atol=1e-4, rtol=0)
