"""The benchmark scripts' own logic on the CPU: the kernel table's derived columns, its atomic
rewrite, and an end-to-end smoke run of the decode benchmark (one process per method, both loops)."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_kernel  # noqa: E402


def _graph_rows(report: str) -> list[list[str]]:
    section = report.split("## CUDA graph")[1].split("## eager")[0]
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| N x K")]


def test_kernel_report_derived_columns(tmp_path):
    names = ["read", "fp16", "ao-int4", "milo-R0", "milo-R32"]
    rows = [
        {"N": 4096, "K": 4096, "M": 1, "floor_us": 2.6, "read": (4.1, 6.0), "fp16": (16.9, 18.0),
         "ao-int4": (9.5, 30.0), "milo-R0": (9.2, 20.0), "milo-R32": (13.8, 25.0)},
        {"N": 1408, "K": 2048, "M": 4, "floor_us": 0.5, "read": ("n/a (y)", "n/a (y)"), "fp16": (6.2, 7.0),
         "ao-int4": ("n/a (x)", "n/a (x)"), "milo-R0": (6.2, 9.0), "milo-R32": (10.0, 12.0)},
    ]
    results = {"header": "device: test", "bw": 2.86e12, "rows": rows}

    class Args:
        out = str(tmp_path / "k.md")
        no_eager = False

    bench_kernel.write_report(results, names, Args)
    report = open(Args.out).read()
    assert report == bench_kernel.render_report(results, names, False)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert json.load(open(tmp_path / "k.json"))["rows"][0]["milo-R0"] == [9.2, 20.0]
    first, second = _graph_rows(report)
    # columns: N x K, M, floor, names..., R0 % of floor, R0 % of read, R0 x fp16, R0 x ao-int4, R32 cost
    assert first[:3] == ["4096x4096", "1", "2.6"]
    assert first[-5:] == [f"{100 * 2.6 / 9.2:.0f}%", f"{100 * 4.1 / 9.2:.0f}%", f"{16.9 / 9.2:.2f}", f"{9.5 / 9.2:.2f}",
                          f"{100 * (13.8 / 9.2 - 1):+.0f}%"]
    assert second[-5:] == [f"{100 * 0.5 / 6.2:.0f}%", "n/a", "1.00", "n/a", f"{100 * (10.0 / 6.2 - 1):+.0f}%"]
    eager = report.split("## eager")[1]
    assert "| 4096x4096 | 1 | 2.6 | 6.0 | 18.0 | 30.0 | 20.0 | 25.0 |" in eager


def test_decode_benchmark_smoke(tmp_path):
    """Tiny Mixtral, eager on the CPU: every method in its own process reports both loops, and the
    milo model holds fewer weight bytes than bf16."""
    out, rows_json = tmp_path / "d.md", tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_decode.py"), "--smoke", "--steps", "2", "--warm", "1",
           "--methods", "bf16,milo,milo+freeze,milo+topk", "--out", str(out), "--rows-json", str(rows_json)]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=600)
    rows = {r["method"]: r for r in json.load(open(rows_json))}
    assert set(rows) == {"bf16", "milo", "milo+freeze", "milo+topk"}, rows
    for r in rows.values():
        assert "error" not in r, r
        assert r["tok_s"] > 0 and r["tok_s_synced"] > 0 and r["host_ms"] > 0
        assert r["ms"] == pytest.approx(1e3 / r["tok_s"], rel=1e-6)
    assert rows["milo"]["gib"] < rows["bf16"]["gib"]
    assert rows["milo+freeze"]["gib"] == pytest.approx(rows["milo"]["gib"]) == rows["milo+topk"]["gib"]
    table = open(out).read()
    assert "| bf16 | 1 |" in table and "| milo | 1 |" in table


def test_decode_layers_that_fit():
    """--layers auto: the most layers whose bf16 weights fit in 85% of the free memory, checked against
    the meta-device byte counts of whole models, at most 32."""
    import bench_decode

    five = bench_decode.bf16_bytes(5, smoke=True)
    assert bench_decode.layers_that_fit(five / 0.85 + 1, smoke=True) == 5
    assert bench_decode.layers_that_fit(five / 0.85 - 1, smoke=True) == 4
    assert bench_decode.layers_that_fit(1e15, smoke=True) == 32
    # full-size Mixtral layers on an 80 GB GPU with about 79 GiB free: 24 layers of bf16 (2.8 GiB each)
    assert bench_decode.layers_that_fit(79 * 2**30) == 24


def test_moe_benchmark_methods_compute_the_same_layer():
    """bench_moe.py's milo variants time one layer several ways; they must compute the same thing: the ragged
    stacks with and without their ranks reaching the op (milo-padded), and the layer with its shared MLP in the
    experts' launches (milo-fused) against the MLP run beside them (its token bound set to 0; float32, CPU ops)."""
    import torch

    import bench_moe

    spec = dict(E=6, k=2, H=128, I=128, shared=2)
    gen = torch.Generator().manual_seed(3)
    ranks = [bench_moe.RAGGED[e % len(bench_moe.RAGGED)] for e in range(spec["E"])]
    mod = bench_moe.milo_module(spec, torch.float32, "cpu", gen, 8, ranks)
    (idx, w), = bench_moe.routings(3, spec, 1, "cpu", gen, torch.float32)
    x = torch.randn(3, spec["H"], generator=gen)
    experts, shared = bench_moe.fused_block(spec, torch.float32, "cpu", gen, 8)
    assert experts.milo_shared.count == 2 and experts.milo_shared.applies(experts, 3)
    with torch.no_grad():
        torch.testing.assert_close(bench_moe.padded(mod)(x, idx, w), mod(x, idx, w), rtol=1e-5, atol=1e-6)
        fused = experts(x, idx, w) + shared(x)
        bound, experts.milo_shared.max_tokens = experts.milo_shared.max_tokens, 0
        beside = experts(x, idx, w) + shared(x)
        experts.milo_shared.max_tokens = bound
    assert shared(x).dim() == 0  # within the bound the MLP's share came from the experts' call
    torch.testing.assert_close(fused, beside, rtol=1e-5, atol=1e-5)
