"""TP/PP workers on Ray: `kvrelay serve` shape flags reach each role's engine config, shapes
this version cannot serve are refused by flag name, and a worker whose tp x pp devices the
cluster does not have fails start-up within the placement timeout, leaving nothing behind."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util import placement_group_table

from cluster.config import ClusterConfig
from cluster.launcher import check_shapes, launch, worker_spec
from cluster.serve import build_config, describe, parse_args
from cluster.worker_groups import PlacementUnavailable, stage_bundles
from workers.config import EngineConfig
from workers.errors import InvalidParameter


def test_shape_flags_reach_each_roles_engine():
    config = build_config(parse_args(["--model", "/m/x", "--prefill-tp", "2", "--prefill-pp",
                                      "3", "--decode-tp", "4", "--placement-timeout", "5"]))
    assert config.shape("prefill") == (2, 3) and config.shape("decode") == (4, 1)
    spec = worker_spec(config, "prefill-0", "prefill")
    assert (spec.engine.tp_size, spec.engine.pp_size) == (2, 3)
    assert worker_spec(config, "decode-0", "decode").engine.tp_size == 4
    assert config.placement_timeout_s == 5.0
    colocated = build_config(parse_args(["--model", "/m/x", "--colocated", "2", "--tp", "2",
                                         "--pp", "2"]))
    assert colocated.shape("colocated") == (2, 2)
    assert "2 colocated tp2xpp2" in describe(colocated)


def test_stage_bundles_hold_a_stages_tp_devices():
    assert stage_bundles(4, 2, cuda=True) == [{"GPU": 4.0}, {"GPU": 4.0}]
    assert len(stage_bundles(2, 3, cuda=False)) == 3


def test_unservable_shapes_are_refused_by_flag_name():
    engine = EngineConfig(model="/m/x")
    with pytest.raises(InvalidParameter, match="'kv_transport'.*rank to rank"):
        check_shapes(ClusterConfig(engine=engine, model_name="x", decode_tp=2,
                                   kv_transport="zmq"))
    with pytest.raises(InvalidParameter, match="'tp'"):
        check_shapes(ClusterConfig(engine=engine, model_name="x", num_colocated=1, tp=0))


def test_missing_devices_fail_start_up_within_the_timeout(tiny_model_dir):
    """Two GPUs asked of a CPU-only Ray: a clear error after the placement timeout, not a
    wait forever, and no placement group or actor left behind."""
    ray.init(num_cpus=2, include_dashboard=False, namespace="kvrelay", ignore_reinit_error=True)
    try:
        engine = EngineConfig(model=str(tiny_model_dir), device="cuda")
        config = ClusterConfig(engine=engine, model_name="tiny", name="noplace",
                               num_colocated=1, tp=2, placement_timeout_s=2.0)
        start = time.monotonic()
        with pytest.raises(PlacementUnavailable, match=r"tp 2 x pp 1 = 2 GPU.* 0 GPU"):
            launch(config)
        assert time.monotonic() - start < 30
        states = [g["state"] for g in placement_group_table().values()]
        assert all(state == "REMOVED" for state in states), states
    finally:
        ray.shutdown()


def test_serve_refuses_an_unservable_shape_before_ray_starts(capsys):
    from cluster.serve import main

    assert main(["--model", "smollm2", "--decode-tp", "2", "--kv-transport", "zmq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvrelay serve: error: invalid parameter 'kv_transport'")
    assert not ray.is_initialized()
