"""KV transfer between prefill and decode workers (push variant; see base.py for the contract).

Transports, one class per end each, per `TransferConfig.transport` (`make_sender` picks the
sender): torch.distributed NCCL/gloo, streamed layer by layer during prefill (torch_sender.py,
torch_receiver.py); and two that move a prefilled request whole behind a TransferHeader, the
WholeSending / WholeReceiving protocol of base.py: ZMQ frames (zmq_transport.py) and CUDA IPC
device-to-device copies between two processes on one GPU (cuda_ipc.py). `TorchSender` and
`Sender` (whole) keep the pairs' lifecycle and the transfer table on the prefill side, one
`Receiver` on the decode side; `InProcessSender` / `InProcessReceiver` serve engine tests.
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
from workers.kv_transfer.torch_sender import TorchSender


def make_sender(layout: KVLayout, kv_caches, config: TransferConfig, **kwargs) -> KVSender:
    """The sender for `config.transport`: torch streams (TorchSender); zmq and cuda_ipc move
    a prefilled request whole (Sender). kwargs: on_done, on_failed, sender_id."""
    cls = TorchSender if config.transport == "torch" else Sender
    return cls(layout, kv_caches, config, **kwargs)


__all__ = [
    "InProcessHub", "InProcessReceiver", "InProcessSender", "KVLayout", "KVReceiver",
    "KVSender", "Receiver", "Sender", "TorchSender", "TransferConfig", "TransferHeader",
    "TransferPlan",
    "TransferState", "check_compatible", "make_sender", "plan_transfer", "slice_for_rank",
]
