"""A top-k MoE router's forward (GEMM, float32 softmax, top-k, renormalization): milo::router_topk against
torch's ops as transformers' routers run them, eager and compiled (inductor), µs per call under CUDA graphs.

    python benchmarks/bench_router.py [--ms 1,4,16,64,256] [--routers mixtral,qwen3,qwen2moe,olmoe] [--out FILE]

Each call reads another copy of the router's weight (enough copies to leave L2 cold), as a decode step reads
each layer's router once. Rows: median of the graph replays; `speedup` = torch compiled / milo.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_header, time_graph  # noqa: E402

import milo_tensor  # noqa: E402,F401  (registers milo::router_topk and loads the CUDA kernels)
from milo_tensor.ops.reference import router_topk as torch_router  # noqa: E402  (torch's ops, as transformers' routers)

# name: (experts, hidden, top_k, renormalize), as transformers' configs of those models
ROUTERS = {
    "mixtral": (8, 4096, 2, True),
    "qwen3": (128, 2048, 8, True),
    "qwen2moe": (60, 2048, 4, False),
    "olmoe": (64, 2048, 8, False),
}


def milo_router(x, weight, top_k, renormalize):
    return torch.ops.milo.router_topk(x, weight, top_k, renormalize)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_router.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dtype = "cuda", torch.bfloat16
    compiled = torch.compile(torch_router, fullgraph=True)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    lines = [env_header(), "", "| router | E x H, top-k | M | torch | torch compiled | milo | speedup |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    for name in args.routers.split(","):
        E, H, k, renorm = ROUTERS[name]
        copies = min(256, math.ceil(2 * l2 / (E * H * 2)))
        weights = [torch.randn(E, H, device=dev, generator=gen).to(dtype) * H ** -0.5 for _ in range(copies)]
        for M in (int(m) for m in args.ms.split(",")):
            x = torch.randn(M, H, device=dev, generator=gen).to(dtype)
            got = milo_router(x, weights[0], k, renorm)
            want = torch_router(x, weights[0], k, renorm)
            torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-2)  # a sanity check; tests/ tests it
            row = []
            for fn in (torch_router, compiled, milo_router):
                calls = [lambda w=w, fn=fn: fn(x, w, k, renorm) for w in weights]
                row.append(time_graph(calls, replays=args.replays))
            line = (f"| {name} | {E}x{H}, {k} | {M} | {row[0]:.1f} | {row[1]:.1f} | {row[2]:.1f} | "
                    f"{row[1] / row[2]:.2f}x |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
