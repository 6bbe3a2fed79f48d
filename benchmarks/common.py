"""Helpers shared by bench_moe.py and bench_decode.py: timing, bandwidth, random MiLo weights."""

from __future__ import annotations

import math
import statistics
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_graph(calls, replays=20, min_calls=8):
    """Median time per call (us) of a CUDA graph running every callable once (repeated so a replay
    holds >= min_calls calls). Raises if capture fails."""
    reps = max(1, math.ceil(min_calls / len(calls)))
    seq = calls * reps
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in seq:
            c()
    for _ in range(3):
        g.replay()
    sync()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(seq))
    del g
    return statistics.median(times)


def time_eager(calls, rounds=10, min_calls=8):
    reps = max(1, math.ceil(min_calls / len(calls)))
    seq = calls * reps
    for c in calls:
        c()
    sync()
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for c in seq:
                c()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / len(seq))
        else:
            t = time.perf_counter()
            for c in seq:
                c()
            times.append((time.perf_counter() - t) * 1e6 / len(seq))
    return statistics.median(times)


def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    if not torch.cuda.is_available():
        return float("nan")
    n = 1 << 28
    src = torch.empty(n // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return 2 * n / statistics.median(ts)


def random_milo(shape, rank, dtype, device, group_size=64, gen=None, ranks=None):
    """A MiLoInt3Tensor of the given logical shape ([N, K] or [E, N, K]) with random packed codes
    (any int32 bit pattern is a valid word), scales ~1e-2, zeros in [0, 7] and a random rank-`rank`
    compensator (or per-expert `ranks`, zero-padded to the largest): the kernels' speed does not
    depend on how the codes were chosen, so benchmarks skip the MiLo solver."""
    from milo_tensor.tensor import MiLoInt3Tensor

    *lead, N, K = shape
    qdata = torch.randint(-(2**31), 2**31 - 1, (*lead, N, K // 32 * 3), dtype=torch.int32, device=device,
                          generator=gen)
    scales = (torch.rand(*lead, N, K // group_size, device=device, generator=gen) * 0.01 + 0.005).to(dtype)
    zeros = (torch.rand(*lead, N, K // group_size, device=device, generator=gen) * 7).to(dtype)
    ranks = list(ranks) if ranks is not None else [rank] * (lead[0] if lead else 1)
    rank = max(ranks)
    ut = (torch.randn(*lead, rank, N, device=device, generator=gen) * 0.02).to(dtype)
    v = (torch.randn(*lead, rank, K, device=device, generator=gen) * 0.02).to(dtype)
    if lead:
        for e, r in enumerate(ranks):  # an expert's rows past its rank are zero padding
            ut[e, r:] = 0
            v[e, r:] = 0
    return MiLoInt3Tensor(qdata, scales, zeros, ut, v, tuple(shape), group_size, ranks)


def milo_bytes(N, K, R, group_size=64, elem=2):
    """Bytes a MiLo weight occupies: codes, scales, zeros, U and V."""
    return N * K * 3 // 8 + 2 * elem * N * (K // group_size) + elem * R * (N + K)


def env_header():
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    dev = f"{props.name}, {props.multi_processor_count} SMs" if props else "CPU"
    return (f"device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
