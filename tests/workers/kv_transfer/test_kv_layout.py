"""KVLayout, transfer-plan intersection math and the handshake check."""

from __future__ import annotations

import pytest

from workers.errors import HandshakeMismatch
from workers.kv_transfer import (
    KVLayout,
    TransferHeader,
    check_compatible,
    plan_transfer,
    slice_for_rank,
)
from workers.kv_transfer.messages import Hello
from workers.protocol import decode, encode

MODEL = KVLayout("llama-3-8b", "bfloat16", 16, num_layers=32, num_kv_heads=8, head_dim=128)


def test_prefill_tp2_plans_tile_decode_tp1():
    decode_rank = slice_for_rank(MODEL, 0, 1)
    plans = [plan_transfer(slice_for_rank(MODEL, r, 2), decode_rank) for r in range(2)]
    assert [(p.kv_head_start, p.kv_head_end) for p in plans] == [(0, 4), (4, 8)]
    assert all((p.layer_start, p.layer_end) == (0, 32) for p in plans)
    assert sum(p.num_cells for p in plans) == 32 * 8
    # Receiver-local head slices are where each half lands in the TP=1 cache.
    assert [p.local_heads(decode_rank) for p in plans] == [slice(0, 4), slice(4, 8)]
    assert [p.local_heads(slice_for_rank(MODEL, r, 2)) for r, p in enumerate(plans)] == \
        [slice(0, 4), slice(0, 4)]


def test_prefill_tp1_feeds_decode_tp2_and_pp2_feeds_pp1():
    sender = slice_for_rank(MODEL, 0, 1)
    halves = [plan_transfer(sender, slice_for_rank(MODEL, r, 2)) for r in range(2)]
    assert [p.local_heads(sender) for p in halves] == [slice(0, 4), slice(4, 8)]
    stages = [plan_transfer(slice_for_rank(MODEL, 0, 1, pp, 2), sender) for pp in range(2)]
    assert [(p.layer_start, p.layer_end) for p in stages] == [(0, 16), (16, 32)]
    assert stages[1].local_layers(slice_for_rank(MODEL, 0, 1, 1, 2)) == range(0, 16)
    assert stages[1].local_layers(sender) == range(16, 32)


def test_uneven_split_and_mixed_tp_pp_overlap():
    layout = KVLayout("m", "float16", 16, num_layers=5, num_kv_heads=6, head_dim=64)
    assert [slice_for_rank(layout, r, 4).kv_heads for r in range(4)] == \
        [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    plan = plan_transfer(slice_for_rank(layout, 1, 2, 0, 2), slice_for_rank(layout, 1, 3, 0, 1))
    assert (plan.layer_start, plan.layer_end, plan.kv_head_start, plan.kv_head_end) == \
        (0, 3, 3, 4)
    assert plan.num_bytes(layout, num_blocks=7) == 2 * 3 * 7 * 16 * 1 * 64 * 2


def test_disjoint_slices_have_no_plan():
    assert plan_transfer(slice_for_rank(MODEL, 0, 2), slice_for_rank(MODEL, 1, 2)) is None
    assert plan_transfer(slice_for_rank(MODEL, 0, 1, 0, 2),
                         slice_for_rank(MODEL, 0, 1, 1, 2)) is None


@pytest.mark.parametrize("field,value", [("block_size", 32), ("dtype", "float16"),
                                         ("model", "other"), ("head_dim", 64),
                                         ("version", "9.9.9")])
def test_handshake_mismatch_names_the_field_and_both_values(field, value):
    remote = KVLayout(**{**MODEL.to_dict(), field: value})
    with pytest.raises(HandshakeMismatch) as info:
        check_compatible(MODEL, remote)
    assert info.value.field == field
    assert field in str(info.value)
    assert repr(getattr(MODEL, field)) in str(info.value) and repr(value) in str(info.value)


def test_handshake_accepts_different_slices():
    check_compatible(slice_for_rank(MODEL, 0, 2), slice_for_rank(MODEL, 0, 1, 1, 2))


FP8_SCALES = tuple((layer, 0.01 * (layer + 1), 0.02 * (layer + 1)) for layer in range(32))
FP8_MODEL = KVLayout("llama-3-8b", "float8_e4m3fn", 16, 32, 8, 128, kv_scales=FP8_SCALES)


def test_kv_scale_mismatch_names_the_field_and_the_first_differing_layer():
    scales = [list(s) for s in FP8_SCALES]
    scales[9][2] = 0.5  # layer 9's V scale
    scales[20][1] = 0.25  # a later layer's K: not the first
    remote = KVLayout(**{**FP8_MODEL.to_dict(), "kv_scales": scales})
    with pytest.raises(HandshakeMismatch) as info:
        check_compatible(FP8_MODEL, remote)
    assert info.value.field == "kv_scales"
    assert info.value.local == f"layer 9: k_scale {0.1!r}, v_scale {0.2!r}"
    assert info.value.remote == f"layer 9: k_scale {0.1!r}, v_scale 0.5"
    assert "'kv_scales'" in str(info.value) and "layer 9" in str(info.value)


def test_kv_scales_compare_on_shared_layers_and_survive_the_wire_and_slicing():
    stage = slice_for_rank(FP8_MODEL, 0, 2, 1, 2)  # layers 16..31, the first 4 kv heads
    assert [s[0] for s in stage.kv_scales] == list(range(16, 32))
    other_stage = KVLayout(**{**FP8_MODEL.to_dict(), "kv_scales": [(0, 9.0, 9.0)]})
    check_compatible(stage, other_stage)  # no layer in common: nothing to disagree on
    wired = KVLayout.from_dict(decode(encode(Hello("s", stage.to_dict(), "torch"))).layout)
    assert wired == stage
    check_compatible(stage, wired)
    check_compatible(FP8_MODEL, KVLayout(**{**FP8_MODEL.to_dict(), "kv_scales": ()}))


def test_layout_rejects_slices_outside_the_model():
    with pytest.raises(ValueError, match="kv heads"):
        KVLayout("m", "bfloat16", 16, 2, 4, 8, kv_head_start=2, kv_head_end=5)


def test_header_round_trips_through_the_codec():
    header = TransferHeader("req-1", MODEL.to_dict(), [5, 1, 9], 3, 1 << 20, "bfloat16",
                            {"first_token_id": 42}, num_tokens=37, generation=2)
    assert decode(encode(header)) == header
    assert KVLayout.from_dict(decode(encode(header)).src_layout) == MODEL
