"""Codec micro-benchmark: small control frames and large array frames.

Prints, as its last line, one JSON object: microseconds per small-frame encode, decode and
round trip (HMAC and replay check included), and the throughput of framing, authenticating
and decoding a large float32 array in a ``Result`` (encode is bounded by the HMAC; decode
after authentication is zero-copy, so it does not depend on the array's size).

    python benchmarks/codec.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mesh.protocol.codec import FRAME_PREFIX, Codec, decode_body
from mesh.protocol.messages import Capabilities, Load, NodeId, Result, TaskId, Wire

KEY = b"benchmark-key-32-bytes-long-1234"
NOW = 1_700_000_000.0
RX = NodeId("rx")


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Best of five timed batches, in microseconds per call."""
    n = 1
    while True:  # size a batch to take about a fifth of the budget
        start = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - start
        if took >= seconds / 5 or n >= 1 << 24:
            break
        n *= 2
    best = took / n
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    args = parser.parse_args()
    budget = 0.2 if args.quick else 1.0

    tx = Codec(KEY, NodeId("tx"), max_frame_bytes=1 << 30, boot=1)
    rx = Codec(KEY, NodeId("rx"), max_frame_bytes=1 << 30, boot=2)
    small: Wire = Capabilities(
        resources={"cpu": 8.0, "gpu": 1.0, "memory": 3.2e10},
        libraries={"numpy": "2.4.6", "torch": "2.13.0"},
        tasks=("preprocess", "features", "train", "infer"),
        labels={"room": "lab"},
    )
    small_frame = tx.encode_bytes(small, NOW, to=RX)

    def encode_small() -> object:
        return tx.encode(small, NOW, to=RX)

    def decode_small() -> object:
        # Fresh frames each time: the replay guard must see new sequence numbers.
        return rx.decode(tx.encode_bytes(small, NOW, to=RX), NOW)

    encode_us = per_call_us(encode_small, budget)
    round_trip_us = per_call_us(decode_small, budget)
    load = Load(running=2, queued=5, backlog_s=1.5)
    load_us = per_call_us(lambda: rx.decode(tx.encode_bytes(load, NOW, to=RX), NOW), budget)

    mib = 64
    array = np.random.default_rng(0).standard_normal(mib << 18, dtype=np.float32)
    result_msg = Result(tasks=(TaskId("t1"),), values=(array,), run_s=(0.1,))
    big_frame = tx.encode_bytes(result_msg, NOW, to=RX)

    def decode_big() -> Any:
        # The body alone: the MAC is timed apart, and a Codec would refuse the replays.
        return decode_body(memoryview(big_frame)[FRAME_PREFIX:], offset=FRAME_PREFIX)

    big_budget = budget * 2
    encode_big_s = per_call_us(lambda: tx.encode(result_msg, NOW, to=RX), big_budget) / 1e6
    join_big_s = per_call_us(lambda: tx.encode_bytes(result_msg, NOW, to=RX), big_budget) / 1e6
    auth_big_s = per_call_us(lambda: rx.authenticate(big_frame), big_budget) / 1e6
    decode_big_s = per_call_us(decode_big, big_budget) / 1e6
    decoded = decode_big()[6][1][0]  # envelope -> Result fields -> values -> the array
    zero_copy = bool(np.shares_memory(decoded, np.frombuffer(big_frame, dtype=np.uint8)))
    check = rx.decode(big_frame, NOW).msg
    if not (isinstance(check, Result) and np.array_equal(check.values[0], array)):
        raise SystemExit("the array did not survive the round trip")
    gib = mib / 1024
    result = {
        "benchmark": "codec",
        "small_frame_bytes": len(small_frame),
        "small_encode_us": round(encode_us, 2),
        "small_round_trip_us": round(round_trip_us, 2),
        "load_round_trip_us": round(load_us, 2),
        "array_mib": mib,
        "array_encode_gbps": round(gib / encode_big_s, 2),
        "array_encode_joined_gbps": round(gib / join_big_s, 2),
        "array_authenticate_gbps": round(gib / auth_big_s, 2),
        "array_decode_gbps": round(gib / decode_big_s, 1),
        "array_decode_zero_copy": zero_copy,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
