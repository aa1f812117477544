"""OutputReceiver: real ZMQ PUSH sockets in other threads feeding the gateway's one PULL socket."""

from __future__ import annotations

import asyncio
import threading

import zmq

from router.output_receiver import OutputReceiver
from workers.engine.sampling_params import SamplingParams
from workers.protocol import GenerateRequest, OutputChunk, encode


def _push_from_thread(address: str, messages: list[bytes]) -> threading.Thread:
    def run() -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        for msg in messages:
            sock.send(msg)
        sock.close(linger=2000)
        ctx.term()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def _drain(queue: asyncio.Queue, count: int) -> list[OutputChunk]:
    return [await asyncio.wait_for(queue.get(), timeout=5) for _ in range(count)]


def test_interleaved_chunks_from_two_workers_reach_their_own_queue_in_order():
    async def scenario() -> None:
        receiver = OutputReceiver()
        await receiver.start()
        try:
            qa, qb = receiver.register("a"), receiver.register("b")
            # Two workers, each interleaving chunks of both requests.
            w1 = []
            for i in range(10):
                w1 += [encode(OutputChunk("a", [2 * i])), encode(OutputChunk("b", [i]))]
            w2 = [encode(OutputChunk("a", [i])) for i in range(1, 20, 2)]
            threads = [_push_from_thread(receiver.address, w1),
                       _push_from_thread(receiver.address, w2)]
            got_a = await _drain(qa, 20)
            got_b = await _drain(qb, 10)
            for thread in threads:
                thread.join(timeout=5)
        finally:
            await receiver.stop()
        assert [c.new_token_ids[0] for c in got_b] == list(range(10))
        # Each worker's own chunks keep their order (ZMQ is FIFO per connection).
        from_w1 = [c.new_token_ids[0] for c in got_a if c.new_token_ids[0] % 2 == 0]
        from_w2 = [c.new_token_ids[0] for c in got_a if c.new_token_ids[0] % 2 == 1]
        assert from_w1 == list(range(0, 20, 2)) and from_w2 == list(range(1, 20, 2))
        assert receiver.received == 30 and receiver.dropped == 0

    asyncio.run(scenario())


def test_chunks_for_unregistered_ids_are_dropped_and_others_still_flow():
    async def scenario() -> tuple[int, int, list[str]]:
        receiver = OutputReceiver()
        await receiver.start()
        try:
            queue = receiver.register("live")
            receiver.register("gone")
            receiver.unregister("gone")
            msgs = [encode(OutputChunk("gone", [1])), b"not msgpack at all",
                    encode(GenerateRequest("x", [1], SamplingParams(), "tcp://nowhere:1")),
                    encode(OutputChunk("never", [2])),
                    encode(OutputChunk("live", [3], finished=True, finish_reason="stop"))]
            _push_from_thread(receiver.address, msgs).join(timeout=5)
            last = await asyncio.wait_for(queue.get(), timeout=5)
            assert queue.empty()
            return receiver.dropped, receiver.num_registered, [last.finish_reason]
        finally:
            await receiver.stop()

    dropped, registered, reasons = asyncio.run(scenario())
    assert dropped == 2
    assert registered == 1
    assert reasons == ["stop"]


def test_fixed_port_is_honoured_and_released_on_stop():
    async def bind_once(port: int) -> str:
        receiver = OutputReceiver(port=port)
        await receiver.start()
        address = receiver.address
        await receiver.stop()
        return address

    ctx = zmq.Context()
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)
    ctx.term()
    assert asyncio.run(bind_once(port)) == f"tcp://127.0.0.1:{port}"
    # The port is free again: a second receiver can bind it.
    assert asyncio.run(bind_once(port)) == f"tcp://127.0.0.1:{port}"


def test_many_concurrent_requests_each_get_exactly_their_final_chunk():
    n_requests = 200

    async def scenario() -> list[str]:
        receiver = OutputReceiver()
        await receiver.start()
        try:
            queues = {f"r{i}": receiver.register(f"r{i}") for i in range(n_requests)}
            msgs = [encode(OutputChunk(rid, [], finished=True, finish_reason="length"))
                    for rid in reversed(list(queues))]
            _push_from_thread(receiver.address, msgs)
            finals = [await asyncio.wait_for(q.get(), timeout=5) for q in queues.values()]
            return [c.request_id for c in finals]
        finally:
            await receiver.stop()

    assert asyncio.run(scenario()) == [f"r{i}" for i in range(n_requests)]


def test_wildcard_bind_advertises_an_address_workers_can_connect_to():
    async def scenario() -> tuple[str, list[int]]:
        receiver = OutputReceiver(host="0.0.0.0")
        await receiver.start()
        try:
            queue = receiver.register("w")
            _push_from_thread(receiver.address, [encode(OutputChunk("w", [9]))])
            chunk = await asyncio.wait_for(queue.get(), timeout=5)
            return receiver.address, chunk.new_token_ids
        finally:
            await receiver.stop()

    address, tokens = asyncio.run(scenario())
    assert "0.0.0.0" not in address and tokens == [9]


def test_token_one_delayed_behind_token_two_still_comes_out_in_order_once():
    """Prefill worker (token 1) and decode worker (tokens 2..) write one stream over two
    connections: the decode worker's chunks arrive first here, one twice, and one after the
    final chunk; the queue still holds ' Paris' ',' ' France' in order and one final chunk."""

    async def scenario() -> tuple[list[OutputChunk], int]:
        receiver = OutputReceiver()
        await receiver.start()
        try:
            queue = receiver.register("r")
            decode = [OutputChunk("r", [11], text_delta=",", index=1),
                      OutputChunk("r", [11], text_delta=",", index=1),  # sent twice
                      OutputChunk("r", [12], text_delta=" France", index=2, finished=True,
                                  finish_reason="length")]
            _push_from_thread(receiver.address, [encode(c) for c in decode]).join(timeout=5)
            await asyncio.sleep(0.2)
            assert queue.empty()  # nothing can go before token 1
            late = [OutputChunk("r", [10], text_delta=" Paris", index=0),
                    OutputChunk("r", finished=True, finish_reason="abort")]  # after the end
            _push_from_thread(receiver.address, [encode(c) for c in late]).join(timeout=5)
            got = await _drain(queue, 3)
            await asyncio.sleep(0.2)
            assert queue.empty()
            return got, receiver.dropped
        finally:
            await receiver.stop()

    got, dropped = asyncio.run(scenario())
    assert "".join(c.text_delta for c in got) == " Paris, France"
    assert [c.index for c in got] == [0, 1, 2] and [c.finished for c in got] == [0, 0, 1]
    assert dropped == 2
