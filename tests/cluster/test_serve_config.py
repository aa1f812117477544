"""`kvrelay serve` arguments become one frozen ClusterConfig; the start-up pair check names
the differing field; typed errors survive the trip through Ray's pickling."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from cluster.launcher import check_pairs, kv_transport, worker_options, worker_spec
from cluster.serve import build_config, describe, parse_args
from workers.actors.kv_endpoint import transfer_config
from workers.actors.remote_errors import RemoteError, from_wire, to_wire
from workers.errors import HandshakeMismatch, NoCapacity, QueueFull
from workers.kv_transfer.layout import KVLayout


def test_serve_arguments_build_one_frozen_config():
    args = parse_args(["--model", "/m/tiny-llama", "--prefill", "2", "--decode", "3",
                       "--block-size", "32", "--kv-transport", "zmq", "--max-queue", "7",
                       "--port", "9000", "--attention-backend", "triton"])
    config = build_config(args)
    assert config.model_name == "tiny-llama" and not config.colocated
    assert config.engine.cache.block_size == config.router.block_size == 32
    assert config.engine.attention_backend == "triton" and config.engine.load_format == "auto"
    assert config.kv_transport == "zmq" and config.max_queue == config.router.max_queue == 7
    roles = [role for _, role in config.worker_roles()]
    assert roles == ["prefill", "prefill", "decode", "decode", "decode"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert config.engine.scheduler.policy == "fcfs"
    priority = build_config(parse_args(["--model", "/m/x", "--scheduling-policy", "priority"]))
    assert priority.engine.scheduler.policy == "priority"  # every worker's engine gets it
    bounded = build_config(parse_args(["--model", "/m/x", "--kv-max-pairs", "3"]))
    assert worker_spec(bounded, "prefill-0").kv_max_pairs == 3  # the prefill worker's sender
    assert transfer_config("nccl", "h", 3).max_pairs == 3
    banner = describe(config)
    assert "http://127.0.0.1:9000" in banner and "curl" in banner and "tiny-llama" in banner
    assert config.router.max_migrations == 2  # migration on by default


def test_no_migration_reaches_the_router_config():
    config = build_config(parse_args(["--model", "/m/x", "--no-migration"]))
    assert config.router.max_migrations == 0


def test_dummy_config_and_colocated_mode():
    config = build_config(parse_args(["--dummy-config", "/c/llama3-8b.json", "--colocated", "2",
                                      "--gpu-share"]))
    assert config.engine.load_format == "dummy" and config.model_name == "llama3-8b"
    assert [r for _, r in config.worker_roles()] == ["colocated", "colocated"]
    options = worker_options(config, "w")
    assert options["max_restarts"] == config.max_worker_restarts
    assert options["num_gpus"] in (0.0, 0.5)  # half a GPU each where CUDA exists


def test_serve_requires_a_model_source():
    with pytest.raises(SystemExit):
        parse_args(["--prefill", "1"])


def layout(**changes) -> dict:
    base = KVLayout(model="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2,
                    head_dim=8)
    return dataclasses.replace(base, **changes).to_dict()


def test_pair_check_names_the_differing_field():
    infos = {"prefill-0": {"role": "prefill", "kv_layout": layout()},
             "decode-0": {"role": "decode", "kv_layout": layout()}}
    check_pairs(infos)
    infos["decode-1"] = {"role": "decode", "kv_layout": layout(block_size=8)}
    with pytest.raises(HandshakeMismatch) as caught:
        check_pairs(infos)
    assert caught.value.field == "block_size" and "16" in str(caught.value)


def test_typed_errors_round_trip_through_pickle_with_their_numbers():
    for error in (NoCapacity(needed_blocks=5, free_blocks=2), QueueFull(2.5, 9, 8)):
        carried = pickle.loads(pickle.dumps(RemoteError(to_wire(error))))
        back = from_wire(carried.wire)
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)


def test_auto_transport_is_cuda_ipc_when_workers_share_a_gpu():
    config = build_config(parse_args(["--model", "/m/x", "--device", "cuda", "--gpu-share"]))
    assert kv_transport(config) == "cuda_ipc"
    assert worker_options(config, "w")["num_gpus"] == 0.5
    alone = dataclasses.replace(config, gpu_share=False)
    assert kv_transport(alone) == "auto" and worker_options(alone, "w")["num_gpus"] == 1.0
    assert kv_transport(dataclasses.replace(config, kv_transport="gloo")) == "gloo"


def test_prefix_caching_and_redis_flags_reach_their_configs():
    from cluster.launcher import control_plane_factory

    default = build_config(parse_args(["--model", "/m/x"]))
    assert default.engine.cache.enable_prefix_caching and default.redis_url is None
    assert control_plane_factory(default) is None
    config = build_config(parse_args(["--model", "/m/x", "--no-prefix-caching", "--redis-url",
                                      "redis://127.0.0.1:1/0", "--decode-policy",
                                      "cache_aware"]))
    assert not config.engine.cache.enable_prefix_caching
    assert config.router.decode_policy == "cache_aware"
    plane = control_plane_factory(config)()  # what the Router actor calls
    assert plane.backend == "redis" and plane.url == "redis://127.0.0.1:1/0"
    assert plane.keys.cluster == config.name
