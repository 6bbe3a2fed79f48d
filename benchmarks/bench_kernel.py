"""Kernel benchmark: milo::int3_linear against its peers, same device, one run.

    python benchmarks/bench_kernel.py --out bench_kernel.md            # full table
    python benchmarks/bench_kernel.py --quick                          # milo + cuBLAS only

Each (method, N x K, M) is timed inside a CUDA graph that calls the method once per weight copy;
the copies are rotated so that the weights never sit in L2 (enough copies for > 3x the L2 size),
and the time per call is the median over many graph replays / calls per replay. Eager timings
(same rotation, CUDA events around a loop) are reported too. A peer that fails to import, build
or run is reported as "n/a (reason)" and never stops the run.

Methods: fp16 / bf16 cuBLAS (F.linear), torchao int4 tinygemm (Int4WeightOnlyConfig group 64),
gemlite A16W4 / A16W2 (HQQ layout, group 64), torchao int3 (IntxWeightOnlyConfig int3 group 64,
torch.compile), milo int3 at R = 0, 32, 512 (group 64), and the bandwidth floor: the bytes milo
must move at R = 0 (codes, scales, zeros, x, y) over the measured device-to-device copy bandwidth.
That bandwidth is a large copy's; a small weight is read slower than it by any kernel (launch, ramp-up
and tail), so the "read" column times a plain streaming read (Triton) of as many bytes as milo's R = 0
weight, rotated like the weights: what reading those bytes once costs in practice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import copy_bandwidth, time_eager, time_graph  # noqa: E402

# calls per timed replay / eager round: 16 keeps launch overhead averaged over enough calls
MIN_CALLS = 16

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1408, 2048), (768, 2048)]
MS = [1, 4, 16, 64, 256, 1024]
GROUP = 64


def _setup_milo():
    """pack_int3 and the op, from the package or (if it does not import yet) by path."""
    try:
        import milo_tensor  # noqa: F401
        from milo_tensor.ops.cuda import extension_status, load_extension
        from milo_tensor.quant.packing import pack_int3
    except Exception:
        import importlib.util

        def by_path(name, rel):
            spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, rel))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod

        packing = by_path("_milo_packing", "milo_tensor/quant/packing.py")
        cuda = by_path("_milo_cuda", "milo_tensor/ops/cuda.py")
        pack_int3, load_extension, extension_status = packing.pack_int3, cuda.load_extension, cuda.extension_status
        if not hasattr(torch.ops.milo, "int3_linear"):
            global _LIB
            _LIB = torch.library.Library("milo", "FRAGMENT")
            _LIB.define(
                "int3_linear(Tensor x, Tensor qdata, Tensor scales, Tensor zeros, Tensor ut, Tensor v, "
                "int group_size, Tensor? bias=None) -> Tensor"
            )
    ok = load_extension()
    return pack_int3, ok, extension_status()


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class NA(Exception):
    pass


def _shapes_and_ms(args):
    """--shapes "NxK,..." and --ms "1,4,..." as [(N, K), ...] and [M, ...]."""
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    return shapes, [int(m) for m in args.ms.split(",") if m]


def _n_copies(bytes_per_copy, l2_bytes, cap=512):
    return int(max(2, min(cap, math.ceil(3 * l2_bytes / max(1, bytes_per_copy)))))


# ------------------------------------------------------------------------------------------------
# methods: each returns (weights_builder(copy_index) -> state, call(state, x) -> y, bytes/copy, x dtype)
# ------------------------------------------------------------------------------------------------


def m_cublas(dtype):
    def build(N, K, i):
        return torch.randn(N, K, device="cuda", dtype=dtype) * 0.02

    def call(w, x):
        return F.linear(x, w)

    return build, call, lambda N, K: N * K * 2, dtype


def m_milo(R, pack_int3, dtype=torch.float16):
    def build(N, K, i):
        codes = torch.randint(0, 8, (N, K), device="cuda", dtype=torch.int32)
        q = pack_int3(codes)
        s = (torch.rand(N, K // GROUP, device="cuda") * 0.01 + 0.005).to(dtype)
        z = (torch.rand(N, K // GROUP, device="cuda") * 7).to(dtype)
        ut = (torch.randn(R, N, device="cuda") * 0.05).to(dtype)
        v = (torch.randn(R, K, device="cuda") * 0.05).to(dtype)
        return q, s, z, ut, v

    def call(st, x):
        q, s, z, ut, v = st
        return torch.ops.milo.int3_linear(x, q, s, z, ut, v, GROUP, None)

    return build, call, lambda N, K: N * K * 3 // 8 + 4 * N * (K // GROUP) + 2 * R * (N + K), dtype


def m_read():
    """Not a matmul: a plain streaming read (Triton, 16-byte loads, 32 KB a program, a max per program) of as
    many bytes as milo's R = 0 weight (codes, scales, zeros): what reading those bytes once costs at this size,
    where launch, ramp-up and tail keep any kernel under the copy bandwidth the floor assumes."""
    import triton
    import triton.language as tl

    @triton.jit
    def read_max(src, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + tl.program_id(0), tl.max(tl.load(src + offs, mask=offs < n, other=0), 0))

    block = 8192

    def build(N, K, i):
        n = N * K * 3 // 32 + N * (K // GROUP)
        src = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda")
        return src, torch.empty(triton.cdiv(n, block), dtype=torch.int32, device="cuda")

    def call(st, x):
        src, out = st
        read_max[(out.numel(),)](src, out, src.numel(), BLOCK=block, num_warps=8)
        return out

    return build, call, lambda N, K: N * K * 3 // 8 + 4 * N * (K // GROUP), torch.float16


def m_ao_int4():
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    def build(N, K, i):
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        try:
            cfg = Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d")
        except TypeError:
            cfg = Int4WeightOnlyConfig(group_size=GROUP)
        quantize_(lin, cfg)
        return lin

    def call(lin, x):
        return lin(x)

    return build, call, lambda N, K: N * K // 2 + 4 * N * (K // GROUP), torch.bfloat16


def m_gemlite(bits):
    import gemlite  # noqa: F401
    from gemlite.helper import A16W2_HQQ_INT, A16W4_HQQ_INT

    cls = A16W4_HQQ_INT if bits == 4 else A16W2_HQQ_INT

    def build(N, K, i):
        wq = torch.randint(0, 2**bits, (N, K), device="cuda", dtype=torch.uint8)
        s = (torch.rand(N, K // GROUP, device="cuda") * 0.01 + 0.005).half()
        z = (torch.rand(N, K // GROUP, device="cuda") * (2**bits - 1)).half()
        return cls(device="cuda", dtype=torch.float16).from_weights(wq, s, z)

    def call(layer, x):
        return layer(x)

    return build, call, lambda N, K: N * K * bits // 8 + 4 * N * (K // GROUP), torch.float16


def m_ao_int3():
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    fn = torch.compile(lambda x, w: F.linear(x, w), dynamic=True)

    def build(N, K, i):
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.float16)
        quantize_(lin, IntxWeightOnlyConfig(weight_dtype=torch.int3, granularity=PerGroup(GROUP)))
        return lin.weight

    def call(w, x):
        return fn(x, w)

    return build, call, lambda N, K: N * K + 4 * N * (K // GROUP), torch.float16


# ------------------------------------------------------------------------------------------------


def fmt(v):
    if isinstance(v, str):
        return v
    return f"{v:.1f}"


def profile_cases(spec):
    pack_int3, ok, status = _setup_milo()
    print(status, flush=True)
    for case in spec.split(","):
        N, K, M, R = (int(v) for v in case.split("x"))
        build, call, _, xdt = m_milo(R, pack_int3)
        st = build(N, K, 0)
        x = torch.randn(M, K, device="cuda").to(xdt)
        for _ in range(2):
            call(st, x)
        torch.cuda.synchronize()
        print(f"profiled {case}", flush=True)


def sweep(args):
    """Path and tuning switches: time milo (per rank of --sweep-ranks) over the values of one
    environment variable (--sweep VAR=v1,v2,...; "-" = unset, the launcher's default), next to fp16
    cuBLAS; every variant first checked against the float32 reference (worst relative error printed)."""
    var, _, values = args.sweep.partition("=")
    values = values.split(",")
    pack_int3, ok, status = _setup_milo()
    print(status, flush=True)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    shapes, ms = _shapes_and_ms(args)
    print(f"\n| N x K | R | M | fp16 | " + " | ".join(f"{var}={v}" for v in values) + " | max rel err |")
    print("|---|---|---|---|" + "---|" * (len(values) + 1))
    for N, K in shapes:
        fb, fcall, fbytes, _ = m_cublas(torch.float16)
        fstates = [fb(N, K, i) for i in range(_n_copies(fbytes(N, K), l2))]
        for R in (int(r) for r in args.sweep_ranks.split(",")):
            build, call, nbytes, xdt = m_milo(R, pack_int3)
            states = [build(N, K, i) for i in range(_n_copies(nbytes(N, K), l2))]
            q, sc, z, ut, v = states[0]
            w = ((_unpack(q).view(N, K // GROUP, GROUP) - z.float()[..., None]) * sc.float()[..., None]).view(N, K)
            for M in ms:
                x = torch.randn(M, K, device="cuda").to(xdt)
                ref = x.float() @ w.T + (x.float() @ v.float().T) @ ut.float()
                fp16 = time_graph([(lambda st=st: fcall(st, x)) for st in fstates], replays=10, min_calls=MIN_CALLS)
                row, err = [], 0.0
                for val in values:
                    if val == "-":
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = val
                    err = max(err, ((call(states[0], x).float() - ref).norm() / ref.norm()).item())
                    calls = [(lambda st=st: call(st, x)) for st in states]
                    row.append(f"{time_graph(calls, replays=10, min_calls=MIN_CALLS):.1f}")
                os.environ.pop(var, None)
                print(f"| {N}x{K} | {R} | {M} | {fp16:.1f} | " + " | ".join(row) + f" | {err:.1e} |", flush=True)
            del states
        del fstates


def _unpack(q):
    try:
        from milo_tensor.quant.packing import unpack_int3
    except Exception:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_p", os.path.join(REPO, "milo_tensor/quant/packing.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        unpack_int3 = mod.unpack_int3
    return unpack_int3(q).float()


def render_report(results, names, no_eager):
    header = results["header"]
    lines = ["# milo int3 kernel benchmark\n", header + "\n",
             "Times in microseconds per call, median, CUDA graph with rotated weight copies (L2 cold). "
             "floor = milo R=0 bytes / copy bandwidth.\n"]
    for kind, idx in (("CUDA graph", 0), ("eager", 1)):
        if kind == "eager" and no_eager:
            continue
        lines.append(f"\n## {kind}\n")
        cols = ["N x K", "M", "floor"] + names
        extra = []
        if kind == "CUDA graph" and "milo-R0" in names:
            extra = ["R0 % of floor", "R0 % of read", "R0 x fp16", "R0 x ao-int4", "R32 cost"]
        lines.append("| " + " | ".join(cols + extra) + " |")
        lines.append("|" + "---|" * (len(cols) + len(extra)))
        for r in results["rows"]:
            vals = [f"{r['N']}x{r['K']}", str(r["M"]), fmt(r["floor_us"])]
            vals += [fmt(r[n][idx]) for n in names]
            if extra:
                def num(n):
                    v = r.get(n, ("n/a",))[idx]
                    return v if isinstance(v, float) else None
                r0, f16, i4, r32 = num("milo-R0"), num("fp16"), num("ao-int4"), num("milo-R32")
                rd = num("read")
                vals.append(f"{100 * r['floor_us'] / r0:.0f}%" if r0 else "n/a")
                vals.append(f"{100 * rd / r0:.0f}%" if (r0 and rd) else "n/a")
                vals.append(f"{f16 / r0:.2f}" if (r0 and f16) else "n/a")
                vals.append(f"{i4 / r0:.2f}" if (r0 and i4) else "n/a")
                vals.append(f"{100 * (r32 / r0 - 1):+.0f}%" if (r0 and r32) else "n/a")
            lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_report(results, names, args, final=False):
    """The table so far into --out (and its JSON), each written to a temp file and renamed."""
    report = render_report(results, names, args.no_eager)
    if final:
        print("\n" + report)
    if not args.out:
        return
    for path, text in ((args.out, report),
                       (os.path.splitext(args.out)[0] + ".json", json.dumps(results, indent=1, default=str))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--quick", action="store_true", help="milo and cuBLAS fp16 only")
    ap.add_argument("--methods", default="", help="comma list to restrict the methods")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", default="")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this")
    ap.add_argument("--profile", default="", help="NxKxMxR,...: call milo twice per case (for ncu), no timing")
    ap.add_argument("--sweep", default="", metavar="VAR=v1,v2,...",
                    help="time milo over the values of one switch (e.g. MILO_INT3_GEMV_MAX_M=4096,0: decode kernel "
                         "vs tensor-core kernel); '-' leaves it unset")
    ap.add_argument("--sweep-ranks", default="0", help="--sweep: ranks to time, comma list")
    args = ap.parse_args()
    if args.profile:
        return profile_cases(args.profile)
    if args.sweep:
        return sweep(args)
    t_start = time.time()

    torch.manual_seed(0)
    pack_int3, milo_ok, milo_status = _setup_milo()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    header = (
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB; torch {torch.__version__}"
        f" (CUDA {torch.version.cuda}); copy bandwidth {bw / 1e12:.2f} TB/s (read+write); "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; milo kernels: {milo_status}"
    )
    print(header, flush=True)

    methods = {
        "read": m_read,
        "fp16": lambda: m_cublas(torch.float16),
        "bf16": lambda: m_cublas(torch.bfloat16),
        "ao-int4": m_ao_int4,
        "gl-W4": lambda: m_gemlite(4),
        "gl-W2": lambda: m_gemlite(2),
        "ao-int3": m_ao_int3,
        "milo-R0": lambda: m_milo(0, pack_int3),
        "milo-R32": lambda: m_milo(32, pack_int3),
        "milo-R512": lambda: m_milo(512, pack_int3),
    }
    if args.quick:
        methods = {k: methods[k] for k in ["read", "fp16", "milo-R0", "milo-R32"]}
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods.split(",")}

    shapes, ms = _shapes_and_ms(args)
    results = {"header": header, "bw": bw, "rows": []}

    for N, K in shapes:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached, skipping {N}x{K}", flush=True)
            continue
        print(f"\n== {N} x {K} ==", flush=True)
        table = {m: {} for m in ms}
        for name, factory in methods.items():
            try:
                build, call, nbytes, xdt = factory()
                ncop = _n_copies(nbytes(N, K), l2)
                states = [build(N, K, i) for i in range(ncop)]
            except Exception as e:  # peer unavailable
                reason = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
                print(f"{name}: {reason}", flush=True)
                for M in ms:
                    table[M][name] = (reason, reason)
                continue
            for M in ms:
                try:
                    xs = [torch.randn(M, K, device="cuda").to(xdt) for _ in range(min(ncop, 8))]
                    calls = [(lambda st=st, x=xs[i % len(xs)]: call(st, x)) for i, st in enumerate(states)]
                    tg = time_graph(calls, replays=args.replays, min_calls=MIN_CALLS)
                    te = float("nan") if args.no_eager else time_eager(calls, min_calls=MIN_CALLS)
                    table[M][name] = (tg, te)
                    print(f"  {name:10s} M={M:5d}: graph {tg:8.1f} us  eager {te:8.1f} us", flush=True)
                except Exception as e:
                    reason = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''})"
                    table[M][name] = (reason, reason)
                    print(f"  {name:10s} M={M:5d}: {reason}", flush=True)
                    if os.environ.get("BENCH_TRACE"):
                        traceback.print_exc()
            del states
            torch.cuda.empty_cache()
        for M in ms:
            floor_bytes = N * K * 3 // 8 + 4 * N * (K // GROUP) + 2 * M * (K + N)
            row = {"N": N, "K": K, "M": M, "floor_us": floor_bytes / bw * 1e6}
            for name in methods:
                row[name] = table[M].get(name, ("n/a", "n/a"))
            results["rows"].append(row)
        write_report(results, list(methods), args)  # after every shape: a run cut short keeps its table

    write_report(results, list(methods), args, final=True)


if __name__ == "__main__":
    main()
