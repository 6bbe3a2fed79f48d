"""MoE layer benchmark: one layer's routed experts (+ shared experts), milo vs its peers.

    python benchmarks/bench_moe.py --out bench_moe.md            # GPU, full table
    python benchmarks/bench_moe.py --smoke                       # tiny shapes, any device

Layers (random weights; the kernels' speed does not depend on the values):
  mixtral   E=8   top-2, H=4096, I=14336
  qwen3     E=128 top-8, H=2048, I=768
  dsv2lite  E=64  top-6, H=2048, I=1408, + 2 shared experts (one dense MLP of 2*1408)
Tokens M in 1, 8, 32, 128, 512; each call gets its own random routing (several routings and
several weight copies rotate so that repeated calls do not find the weights in L2).

Methods (the same transformers experts module, MixtralExperts, with gate_up [E, 2I, H] and down
[E, H, I]; shared experts as a gate/up/down MLP):
  milo-grouped   experts_implementation="milo": milo::moe_route (sort by expert), ONE
                 int3_grouped_linear launch for gate_up and one for down, milo::moe_combine (rank 32 per
                 expert; shared experts through int3_linear, rank 32)
  milo-loop      the dense int3 kernel once per active expert (routing known on the host, so this
                 is a lower bound for a per-expert loop: no host sync is timed)
  bf16-grouped   transformers' grouped_mm experts (torch._grouped_mm), bf16
  bf16-eager     transformers' eager per-expert loop, bf16 (host syncs: eager timing only)
  milo-fused     layers with shared experts: the shared MLP as separate gate / up / down MiLo Linear layers (as
                 transformers builds it, rank --rank each), fused into the experts' launches by
                 milo_tensor.fuse_shared_experts (two more experts at dsv2lite; the MLP itself past its
                 token bound); milo-grouped's shared MLP is one [gate | up] weight and a down weight instead
  milo-padded    milo-grouped with every expert's rank taken as the stack's largest (the op not given
                 the ranks, so the kernels multiply the zero padding too): with --ragged, what skipping
                 each expert's padding saves (not in the default --methods)
  floor          bytes of the active experts at 3 bits (+ scales, zeros, U, V) / copy bandwidth
Times: microseconds per layer call, median, CUDA graph (eager for bf16-eager).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import copy_bandwidth, env_header, milo_bytes, random_milo, time_eager, time_graph  # noqa: E402

LAYERS = {
    "mixtral": dict(E=8, k=2, H=4096, I=14336, shared=0),
    "qwen3": dict(E=128, k=8, H=2048, I=768, shared=0),
    "dsv2lite": dict(E=64, k=6, H=2048, I=1408, shared=2),
}
MS = [1, 8, 32, 128, 512]
RANK = 32  # --rank's default: the compensator rank per expert
# --ragged: expert e's rank (MiLo's adaptive policies give routed experts unequal ranks, most of them small)
RAGGED = (0, 8, 16, 32, 64)


def make_module(spec, dtype, device):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=spec["H"], intermediate_size=spec["I"], num_local_experts=spec["E"],
                        num_experts_per_tok=spec["k"])
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod = mod.to_empty(device=device).to(dtype)
    with torch.no_grad():
        mod.gate_up_proj.normal_(0, 0.02)
        mod.down_proj.normal_(0, 0.02)
    mod.config = cfg
    return mod


def set_impl(mod, name):
    mod.config._experts_implementation = name


def milo_module(spec, dtype, device, gen, rank, ranks=None):
    import milo_tensor  # noqa: F401  (registers the "milo" experts implementation)

    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=spec["H"], intermediate_size=spec["I"], num_local_experts=spec["E"],
                        num_experts_per_tok=spec["k"])
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    E, H, I = spec["E"], spec["H"], spec["I"]
    mod.gate_up_proj = torch.nn.Parameter(random_milo((E, 2 * I, H), rank, dtype, device, gen=gen, ranks=ranks),
                                          requires_grad=False)
    mod.down_proj = torch.nn.Parameter(random_milo((E, H, I), rank, dtype, device, gen=gen, ranks=ranks),
                                       requires_grad=False)
    mod.config = cfg
    set_impl(mod, "milo")
    return mod


def shared_mlp_bf16(spec, dtype, device):
    if not spec["shared"]:
        return None
    Is = spec["shared"] * spec["I"]
    H = spec["H"]
    w = [torch.randn(2 * Is, H, device=device, dtype=dtype) * 0.02, torch.randn(H, Is, device=device, dtype=dtype) * 0.02]

    def f(x):
        g, u = F.linear(x, w[0]).chunk(2, -1)
        return F.linear(F.silu(g) * u, w[1])

    return f


def shared_mlp_milo(spec, dtype, device, gen, rank):
    if not spec["shared"]:
        return None
    Is = spec["shared"] * spec["I"]
    H = spec["H"]
    a = random_milo((2 * Is, H), rank, dtype, device, gen=gen)
    b = random_milo((H, Is), rank, dtype, device, gen=gen)
    op = torch.ops.milo.int3_linear

    def f(x):
        g, u = op(x, a.qdata, a.scales, a.zeros, a.ut, a.v, 64).chunk(2, -1)
        return op(F.silu(g) * u, b.qdata, b.scales, b.zeros, b.ut, b.v, 64)

    return f


class SharedMLP(torch.nn.Module):
    """A transformers-style shared-expert MLP (gate_proj, up_proj, down_proj, SiLU) with MiLo weights."""

    def __init__(self, H, Is, rank, dtype, device, gen):
        super().__init__()
        self.gate_proj = torch.nn.Linear(H, Is, bias=False, device="meta")
        self.up_proj = torch.nn.Linear(H, Is, bias=False, device="meta")
        self.down_proj = torch.nn.Linear(Is, H, bias=False, device="meta")
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            shape = (lin.out_features, lin.in_features)
            lin.weight = torch.nn.Parameter(random_milo(shape, rank, dtype, device, gen=gen), requires_grad=False)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(torch.nn.Module):
    """The two parts of a MoE layer fuse_shared_experts looks for."""

    def __init__(self, experts, shared_experts):
        super().__init__()
        self.experts = experts
        self.shared_experts = shared_experts


def fused_block(spec, dtype, device, gen, rank, ranks=None):
    """(experts, shared MLP) of a layer whose shared MLP rides in the experts' launches."""
    from milo_tensor import fuse_shared_experts

    block = MoEBlock(milo_module(spec, dtype, device, gen, rank, ranks),
                     SharedMLP(spec["H"], spec["shared"] * spec["I"], rank, dtype, device, gen))
    fuse_shared_experts(block)
    return block.experts, block.shared_experts


def routings(M, spec, n, device, gen, dtype=torch.bfloat16):
    out = []
    for _ in range(n):
        scores = torch.rand(M, spec["E"], device=device, generator=gen)
        idx = scores.topk(spec["k"], dim=-1).indices
        w = torch.softmax(torch.randn(M, spec["k"], device=device, generator=gen), -1).to(dtype)
        out.append((idx, w))
    return out


def milo_loop_calls(mod, shared, xs, routes, spec):
    """Per-expert dense-kernel loop with the routing fixed at build time (host-side slicing)."""
    up, down = mod.gate_up_proj, mod.down_proj
    op = torch.ops.milo.int3_linear
    calls = []
    for x, (idx, w) in zip(xs, routes):
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=spec["E"]).tolist()
        tok = (order // spec["k"])
        wsorted = w.reshape(-1)[order]
        segs = []
        start = 0
        for e, c in enumerate(counts):
            if c:
                segs.append((e, start, start + c))
            start += c

        def call(x=x, tok=tok, wsorted=wsorted, order=order, segs=segs):
            xs_ = x[tok]
            outs = []
            for e, s, t in segs:
                h = op(xs_[s:t], up.qdata[e], up.scales[e], up.zeros[e], up.ut[e], up.v[e], 64)
                g, u = h.chunk(2, -1)
                outs.append(op(F.silu(g) * u, down.qdata[e], down.scales[e], down.zeros[e], down.ut[e], down.v[e], 64))
            y = torch.cat(outs) * wsorted[:, None]
            out = torch.zeros_like(x).index_add_(0, tok, y)
            if shared is not None:
                out = out + shared(x)
            return out

        calls.append(call)
    return calls


def active_bytes(routes, spec, R, ranks=None):
    """Mean bytes of the active experts (3-bit codes + scales/zeros + U, V, each expert's own rank) per call."""
    H, I = spec["H"], spec["I"]
    rank_of = ranks or [R] * spec["E"]
    active = [torch.unique(idx).tolist() for idx, _ in routes]
    per_call = [sum(milo_bytes(2 * I, H, rank_of[e]) + milo_bytes(H, I, rank_of[e]) for e in act) for act in active]
    n_act = sum(len(act) for act in active) / len(routes)
    shared = milo_bytes(2 * spec["shared"] * I, H, R) + milo_bytes(H, spec["shared"] * I, R) if spec["shared"] else 0
    return sum(per_call) / len(per_call) + shared, n_act


def padded(mod):
    """A view of a milo experts module whose stacks claim the largest rank for every expert: the grouped op
    then gets no ranks and multiplies each expert's zero padding too (same tensors, same result)."""
    import copy

    out = copy.copy(mod)
    out._parameters = dict(mod._parameters)
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(mod, name)
        out._parameters[name] = torch.nn.Parameter(w._with(ranks=(w.ut.shape[1],) * w.shape[0]), requires_grad=False)
    return out


def fmt(v):
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def print_kernels(call) -> None:
    """The kernels one call launches and their GPU time (eager; a graph replays the same ones)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 5
    print(f"    kernels per call {sum(e.count for e in kernels) / 5:.0f}, GPU time {total:.1f} us:", flush=True)
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total):
        print(f"      {e.count / 5:4.0f} x {e.self_device_time_total / e.count:7.1f} us  {e.key[:150]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--methods", default="milo-grouped,milo-loop,bf16-grouped,bf16-eager")
    ap.add_argument("--copies", type=int, default=2, help="weight copies rotated per layer")
    ap.add_argument("--routes", type=int, default=8, help="random routings rotated per M")
    ap.add_argument("--out", default="")
    ap.add_argument("--rank", type=int, default=RANK,
                    help="milo's compensator rank per expert (0: the 3-bit weights alone, to price the low-rank term)")
    ap.add_argument("--ragged", action="store_true",
                    help=f"expert e's rank RAGGED[e %% {len(RAGGED)}] = {RAGGED} instead of --rank (shared experts keep --rank)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                    help="activations and reference weights (the bf16-* methods then run this dtype too)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (any device)")
    ap.add_argument("--profile", action="store_true",
                    help="also list the kernels of one eager milo-grouped call per M (torch.profiler)")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    import milo_tensor  # noqa: F401
    from milo_tensor.ops.cuda import extension_status

    if args.smoke:
        for k in LAYERS:
            LAYERS[k] = dict(LAYERS[k], H=128, I=256)
    gen = torch.Generator(device=device).manual_seed(0)
    bw = copy_bandwidth()
    header = env_header() + f"; {args.dtype}; copy bandwidth {bw / 1e12:.2f} TB/s; milo kernels: {extension_status()}"
    print(header, flush=True)
    methods = args.methods.split(",")
    graphs = device == "cuda"
    rows = []
    for lname in args.layers.split(","):
        spec = LAYERS[lname]
        print(f"\n== {lname} {spec} ==", flush=True)
        mods = {}
        ranks = [RAGGED[e % len(RAGGED)] for e in range(spec["E"])] if args.ragged else None
        if any(m.startswith("milo") for m in methods):
            mods["milo"] = [(milo_module(spec, dtype, device, gen, args.rank, ranks),
                             shared_mlp_milo(spec, dtype, device, gen, args.rank)) for _ in range(args.copies)]
        if "milo-fused" in methods and spec["shared"]:
            mods["milo-fused"] = [fused_block(spec, dtype, device, gen, args.rank, ranks) for _ in range(args.copies)]
        if "milo-padded" in methods:
            mods["milo-padded"] = [(padded(mod), sh) for mod, sh in mods["milo"]]
        if any(m.startswith("bf16") for m in methods):
            mods["bf16"] = [(make_module(spec, dtype, device), shared_mlp_bf16(spec, dtype, device))
                            for _ in range(args.copies)]
        for M in [int(m) for m in args.ms.split(",")]:
            routes = routings(M, spec, args.routes, device, gen, dtype)
            xs = [torch.randn(M, spec["H"], device=device, generator=gen).to(dtype) for _ in routes]
            nbytes, n_act = active_bytes(routes, spec, args.rank, ranks)
            row = {"layer": lname, "M": M, "active": n_act, "floor": nbytes / bw * 1e6}
            for meth in methods:
                fam = meth if meth in ("milo-padded", "milo-fused") else "milo" if meth.startswith("milo") else "bf16"
                if fam not in mods:  # milo-fused: layers without shared experts
                    continue
                try:
                    if meth == "milo-loop":
                        calls = []
                        for i, (mod, sh) in enumerate(mods["milo"]):
                            sel = list(range(i, len(routes), len(mods["milo"])))
                            calls += milo_loop_calls(mod, sh, [xs[j] for j in sel], [routes[j] for j in sel], spec)
                    else:
                        impl = {"milo-grouped": "milo", "milo-padded": "milo", "milo-fused": "milo", "bf16-grouped": "grouped_mm",
                                "bf16-eager": "eager"}[meth]
                        calls = []
                        for i, (x, (idx, w)) in enumerate(zip(xs, routes)):
                            mod, sh = mods[fam][i % len(mods[fam])]
                            set_impl(mod, impl)

                            def call(mod=mod, sh=sh, x=x, idx=idx, w=w, impl=impl):
                                mod.config._experts_implementation = impl
                                out = mod(x, idx, w)
                                return out + sh(x) if sh is not None else out

                            calls.append(call)
                    with torch.no_grad():
                        if graphs and meth != "bf16-eager":
                            t = time_graph(calls)
                        else:
                            t = time_eager(calls, rounds=5)
                    row[meth] = t
                    print(f"  {meth:13s} M={M:4d}: {t:9.1f} us", flush=True)
                    if args.profile and meth == "milo-grouped" and device == "cuda":
                        print_kernels(calls[0])
                except Exception as e:
                    row[meth] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:70] if str(e) else ''})"
                    print(f"  {meth:13s} M={M:4d}: {row[meth]}", flush=True)
            rows.append(row)
        del mods
        if device == "cuda":
            torch.cuda.empty_cache()

    fused = "milo-fused" in methods
    cols = (["layer", "M", "active experts", "floor"] + methods + ["grouped x bf16-grouped", "grouped % of floor"]
            + (["fused x bf16-grouped"] if fused else []))
    lines = ["# MoE layer benchmark\n", header + "\n",
             "Microseconds per layer call (routed experts + shared), median; CUDA graph "
             f"except bf16-eager. milo rank {f'RAGGED[e % {len(RAGGED)}] = {RAGGED}' if args.ragged else args.rank} "
             f"per expert. floor = active-expert bytes at 3 bits / copy bandwidth.\n",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        g, b = r.get("milo-grouped"), r.get("bf16-grouped")
        speed = f"{b / g:.2f}" if isinstance(g, float) and isinstance(b, float) else "n/a"
        pct = f"{100 * r['floor'] / g:.0f}%" if isinstance(g, float) else "n/a"
        vals = [r["layer"], str(r["M"]), f"{r['active']:.1f}", fmt(r["floor"])] + [fmt(r.get(m, "n/a")) for m in methods]
        f = r.get("milo-fused")
        extra = ([f"{b / f:.2f}" if isinstance(f, float) and isinstance(b, float) else "n/a"] if fused else [])
        lines.append("| " + " | ".join(vals + [speed, pct] + extra) + " |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
