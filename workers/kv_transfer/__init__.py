"""KV transfer between prefill and decode workers (push variant; see base.py for the contract).

Backends: `Sender` / `Receiver` (torch.distributed NCCL/gloo, ZMQ frames, or CUDA IPC
device-to-device copies between two processes on one GPU (cuda_ipc.py), per
`TransferConfig.transport`) and `InProcessSender` / `InProcessReceiver` for engine tests.
"""

from workers.kv_transfer.base import KVReceiver, KVSender, TransferHeader, TransferState
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.inprocess import InProcessHub, InProcessReceiver, InProcessSender
from workers.kv_transfer.layout import (
    KVLayout,
    TransferPlan,
    check_compatible,
    plan_transfer,
    slice_for_rank,
)
from workers.kv_transfer.receiver import Receiver
from workers.kv_transfer.sender import Sender

__all__ = [
    "InProcessHub", "InProcessReceiver", "InProcessSender", "KVLayout", "KVReceiver",
    "KVSender", "Receiver", "Sender", "TransferConfig", "TransferHeader", "TransferPlan",
    "TransferState", "check_compatible", "plan_transfer", "slice_for_rank",
]
