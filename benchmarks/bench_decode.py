"""End-to-end decode benchmark: tokens/s of a torch.compile'd (mode="reduce-overhead", i.e. CUDA
graphs) greedy decode loop with a static KV cache, on a Mixtral-shaped model with random weights.

    python benchmarks/bench_decode.py --layers 4 --out bench_decode.md
    python benchmarks/bench_decode.py --layers auto             # as many layers as the bf16 model fits
    python benchmarks/bench_decode.py --smoke                   # tiny model, any device, no compile

Two loops per method: free-running (the host queues the next step while the GPU runs this one, as
a serving loop does) and synced (the host reads every token first, as transformers' generate()
does, so host time adds to GPU time). Each method runs in a fresh process (`--in-process` shares one; there the method compiled second ran
slower); `--profile` prints each method's graph breaks and CUDA kernel times instead of timing.

Model: MixtralConfig (hidden 4096, intermediate 14336, 8 experts top-2, 32 heads / 8 KV heads,
vocab 32000) with --layers decoder layers (the full model has 32; a few layers keep the run and its
compile short; per-layer time scales to the full depth). `--layers auto` takes as many as the widest
method (bf16) fits in 85% of the free GPU memory, at most 32, for every method (compile time grows
with the depth: allow minutes per method).
Methods:
  bf16      the model as is, experts through transformers' grouped_mm
  ao-int4   torchao Int4WeightOnlyConfig(group 64) on the attention Linear layers; the experts
            stay bf16 (torchao's int4 config does not quantize 3D expert parameters)
  milo      every attention Linear and both expert stacks as MiLoInt3Tensor (random codes, rank 64
            attention / 32 per expert; no solver run), experts through the "milo" grouped op
  milo-r0   the same without the low-rank compensator (rank 0): what the compensator costs (not in
            the default --methods)
  <method>+freeze  any of the above compiled with torch._inductor.config.freezing = True: the
            parameters become constants of the compiled graph instead of inputs that every call
            unwraps and checks (for milo: its tensor subclass, per weight, in Python)
  <method>+topk  the routers' whole forward (GEMM, softmax, top-k, renormalization) through
            milo::router_topk (fuse_router_topk); options combine: milo+freeze+topk
  <method>+qkv  each attention's q, k and v projections as one stacked int3 weight (fuse_qkv)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import env_header, random_milo, sync  # noqa: E402


def mixtral_config(layers, smoke):
    from transformers import MixtralConfig

    kw = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              vocab_size=32000)
    if smoke:
        kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return MixtralConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096, **kw)


def bf16_bytes(layers, smoke):
    """Weight bytes of the bf16 model with this many layers (built on the meta device: no memory)."""
    from transformers import MixtralForCausalLM

    with torch.device("meta"):
        model = MixtralForCausalLM(mixtral_config(layers, smoke))
    return sum(p.numel() for p in model.parameters()) * 2


def layers_that_fit(free_bytes, smoke=False, headroom=0.85, cap=32):
    """The most decoder layers whose bf16 weights (the widest method) fit in headroom * free_bytes."""
    one, two = bf16_bytes(1, smoke), bf16_bytes(2, smoke)
    per_layer, fixed = two - one, 2 * one - two
    return max(1, min(cap, int((free_bytes * headroom - fixed) // per_layer)))


def build(layers, device, smoke):
    from transformers import MixtralForCausalLM

    cfg = mixtral_config(layers, smoke)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def to_milo(model, device, attn_rank=64, expert_rank=32):
    import milo_tensor  # noqa: F401
    from milo_tensor.integrations.experts import use_milo_experts

    gen = torch.Generator(device=device).manual_seed(0)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "self_attn" in name:
            w = mod.weight
            mod.weight = torch.nn.Parameter(random_milo(tuple(w.shape), attn_rank, w.dtype, device, gen=gen), requires_grad=False)
        if hasattr(mod, "gate_up_proj") and getattr(mod, "gate_up_proj").ndim == 3:
            for pname in ("gate_up_proj", "down_proj"):
                w = getattr(mod, pname)
                setattr(mod, pname, torch.nn.Parameter(random_milo(tuple(w.shape), expert_rank, w.dtype, device, gen=gen),
                                                       requires_grad=False))
            use_milo_experts(mod)
    model.config._experts_implementation = "milo"
    torch.cuda.empty_cache() if device == "cuda" else None
    return model


def to_ao_int4(model):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    try:
        cfg = Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")
    except TypeError:
        cfg = Int4WeightOnlyConfig(group_size=64)
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "self_attn" in fqn)
    return model


def make_step(model, batch, prompt, max_len, device):
    """A greedy decode step on a static cache, and the prompt ids."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)

    def step(tok, pos):
        out = model(tok, past_key_values=cache, use_cache=True, cache_position=pos)
        return out.logits[:, -1:].argmax(-1)

    return step, ids


def print_step_timeline(prof, steps):
    """The last profiled step's kernels in start order: start and gap before each (µs after the previous
    kernel's end), so the launch gaps a step pays, and which kernel each launch follows, can be read."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    per_step = len(kernels) // max(1, steps)
    last = kernels[len(kernels) - per_step:]
    if not last:
        return
    t0, prev_end, gaps = last[0]["ts"], last[0]["ts"], 0.0
    print(f"\nlast compiled step: {per_step} kernels, start / gap / duration in us", flush=True)
    for e in last:
        gap = e["ts"] - prev_end
        gaps += max(0.0, gap)
        print(f"  {e['ts'] - t0:8.1f} {gap:6.1f} {e['dur']:7.1f}  {e['name'][:100]}", flush=True)
        prev_end = max(prev_end, e["ts"] + e["dur"])
    print(f"step span {prev_end - t0:.1f} us, kernel time {sum(e['dur'] for e in last):.1f}, gaps {gaps:.1f}", flush=True)


def profile_decode(model, prompt, device, steps=8):
    """Where a decode step's time goes: dynamo graph breaks of the step, and the CUDA kernels of
    eager steps (torch.profiler), top 20 by total time."""
    from torch.profiler import ProfilerActivity, profile

    step, ids = make_step(model, 1, prompt, prompt + 4 * steps + 16, device)  # eager, compiled and profiled steps
    with torch.no_grad():
        tok = step(ids, torch.arange(prompt, device=device))
        pos = prompt
        expl = torch._dynamo.explain(step)(tok.clone(), torch.tensor([pos], device=device))
        print(f"dynamo: {expl.graph_count} graphs, {expl.graph_break_count} breaks", flush=True)
        for reason in expl.break_reasons[:5]:
            print(f"  break: {str(reason.reason)[:160]}", flush=True)
        torch._dynamo.reset()
        for _ in range(2):
            tok = step(tok.clone(), torch.tensor([pos], device=device))
            pos += 1
        sync()
        acts = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
        with profile(activities=acts) as prof:
            for _ in range(steps):
                tok = step(tok.clone(), torch.tensor([pos], device=device))
                pos += 1
            sync()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70), flush=True)
    if device != "cuda":
        return
    # The same steps compiled and replayed as CUDA graphs: the kernels the replay runs (and any copies
    # cudagraph trees adds in front of it), and where the host time of a call goes (cProfile; the
    # host time bounds the free-running loop and adds to the GPU time in the synced one).
    import cProfile
    import io
    import pstats

    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    pos_t = torch.tensor([pos], device=device)
    with torch.no_grad():
        for _ in range(4):
            tok = fn(tok.clone(), pos_t)
            pos_t += 1
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                tok = fn(tok.clone(), pos_t)
                pos_t += 1
            sync()
        prof_host = cProfile.Profile()
        for _ in range(steps):
            t_in = tok.clone()
            prof_host.enable()
            tok = fn(t_in, pos_t)
            prof_host.disable()
            pos_t += 1
            sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    print_step_timeline(prof, steps)
    buf = io.StringIO()
    stats = pstats.Stats(prof_host, stream=buf)
    print(f"host side of {steps} compiled calls: {stats.total_tt * 1e3 / steps:.3f} ms per call", flush=True)
    stats.sort_stats("tottime").print_stats(25)
    print(buf.getvalue(), flush=True)


def decode_tps(model, batch, prompt, steps, warm, device, compile_):
    """Two timed loops of `steps` greedy steps each, returning a dict:
    - free-running (tok_s, ms): the position lives on the GPU and is advanced there, so the host
      never waits for a token and queues the next step while the GPU runs this one, as a serving
      loop does; `host_ms` is the host time of one call (median), which bounds the loop from below;
    - synced (tok_s_synced, ms_synced): the host reads each token before the next step, as
      transformers' generate() does (its stopping check), so host and GPU time add up."""
    step, ids = make_step(model, batch, prompt, prompt + warm + 2 * steps + 2, device)
    fn = torch.compile(step, mode="reduce-overhead", fullgraph=False) if compile_ else step
    with torch.no_grad():
        tok = step(ids, torch.arange(prompt, device=device))
        pos = torch.tensor([prompt], device=device)
        t_c = time.perf_counter()
        for _ in range(warm):
            tok = fn(tok.clone(), pos)
            pos += 1
        sync()
        t_warm = time.perf_counter() - t_c
        host = []
        t0 = time.perf_counter()
        for _ in range(steps):
            t_in = tok.clone()
            t1 = time.perf_counter()
            tok = fn(t_in, pos)
            host.append(time.perf_counter() - t1)
            pos += 1
        sync()
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = fn(tok.clone(), pos)
            pos += 1
            tok.cpu()  # the host waits for the token
        dt_synced = time.perf_counter() - t0
    host.sort()
    return dict(tok_s=batch * steps / dt, ms=dt / steps * 1e3, host_ms=host[len(host) // 2] * 1e3,
                tok_s_synced=batch * steps / dt_synced, ms_synced=dt_synced / steps * 1e3, warm_s=t_warm)


def _storages(t):
    """(address, bytes) of the storages behind a tensor (a subclass: its inner tensors')."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [s for n in names if getattr(t, n, None) is not None for s in _storages(getattr(t, n))]
    return [(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())]


def weight_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers: views of one storage
    (fuse_qkv's projections are row slices of its stacks) count once."""
    return sum(dict(s for t in (*model.parameters(), *model.buffers()) for s in _storages(t)).values())


def run_method(meth, args, device, compile_):
    """One method in this process: a row per batch size (decode_tps's dict plus method, batch and
    weight GiB), or one row with an error; with --profile, the profile and no rows."""
    rows, model = [], None
    base, *options = meth.split("+")
    try:
        if set(options) - {"freeze", "topk", "qkv"}:
            raise ValueError(f"unknown method option in {meth} (known: +freeze, +topk, +qkv)")
        if "freeze" in options:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        model = build(args.layers, device, args.smoke)
        if base == "milo":
            model = to_milo(model, device)
        elif base == "milo-r0":
            model = to_milo(model, device, attn_rank=0, expert_rank=0)
        elif base == "ao-int4":
            model = to_ao_int4(model)
        if "topk" in options:
            from milo_tensor import fuse_router_topk

            print(f"{meth}: {fuse_router_topk(model)} routers through milo::router_topk", flush=True)
        if "qkv" in options:
            from milo_tensor import fuse_qkv

            print(f"{meth}: {len(fuse_qkv(model))} attention modules with q/k/v stacked", flush=True)
        if args.profile:
            print(f"== {meth}", flush=True)
            profile_decode(model, args.prompt, device)
            return rows
        nbytes = weight_bytes(model)  # buffers: fuse_qkv's stacks
        for b in [int(v) for v in args.batch.split(",")]:
            r = decode_tps(model, b, args.prompt, args.steps, args.warm, device, compile_)
            rows.append(dict(r, method=meth, batch=b, gib=nbytes / 2**30))
            print(f"{meth:8s} batch {b}: {r['tok_s']:8.1f} tok/s ({r['ms']:.2f} ms/step, host {r['host_ms']:.2f} ms/call), "
                  f"synced {r['tok_s_synced']:.1f} tok/s, weights {nbytes / 2**30:.2f} GiB, warm-up {r['warm_s']:.0f} s",
                  flush=True)
    except Exception as e:
        msg = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''})"
        rows.append(dict(method=meth, error=msg))
        print(f"{meth}: {msg}", flush=True)
        import traceback

        traceback.print_exc()
    finally:  # the next method in this process starts from clean compile caches and free memory
        model = None
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_isolated(meth, args):
    """One method in a fresh process: in one process the method compiled second ran up to 15% slower
    (H100, 2026-11-25: milo 482 tok/s first, 415 after bf16)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--methods", meth, "--rows-json", out,
               "--layers", str(args.layers), "--batch", args.batch, "--prompt", str(args.prompt),
               "--steps", str(args.steps), "--warm", str(args.warm)]
        cmd += ["--no-compile"] if args.no_compile else []
        cmd += ["--smoke"] if args.smoke else []
        subprocess.run(cmd, check=False)
        if not os.path.exists(out):
            return [dict(method=meth, error="n/a (subprocess failed)")]
        with open(out) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="4", help="decoder layers, or 'auto': as many as the bf16 model fits")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--methods", default="bf16,ao-int4,milo,bf16+freeze,milo+freeze,milo+freeze+topk,milo+freeze+topk+qkv")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--profile", action="store_true", help="graph breaks and kernel times per method, no timing")
    ap.add_argument("--in-process", action="store_true", help="all methods in this process (default: one process each)")
    ap.add_argument("--rows-json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.layers == "auto":
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else 2 * bf16_bytes(2, args.smoke)
        args.layers = layers_that_fit(free, args.smoke)
        print(f"--layers auto: {args.layers} layers", flush=True)
    args.layers = int(args.layers)
    compile_ = device == "cuda" and not args.no_compile
    import milo_tensor  # noqa: F401
    from milo_tensor.ops.cuda import extension_status

    header = env_header() + f"; milo kernels: {extension_status()}"
    print(header, flush=True)
    methods = args.methods.split(",")
    if len(methods) > 1 and not args.profile and not args.in_process:
        rows = [row for meth in methods for row in run_isolated(meth, args)]
    else:
        rows = [row for meth in methods for row in run_method(meth, args, device, compile_)]
    lines = ["# Decode benchmark\n", header + "\n",
             f"Mixtral-shaped model, {args.layers} decoder layers, random weights; greedy decode, static KV cache, "
             f"prompt {args.prompt}, {args.steps} timed steps after {args.warm} warm-up steps; "
             f"{'torch.compile mode=reduce-overhead (CUDA graphs)' if compile_ else 'eager'}.\n",
             "Free-running: the next step is queued while the GPU runs this one (position kept on the GPU); "
             "host ms is one call's host time (median). Synced: the host reads every token before the next "
             "step, as transformers' generate() does.\n",
             "| method | batch | tokens/s | ms / step | ms / layer | host ms / call | tokens/s synced | ms / step synced "
             "| weights GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | - | {r['error']} | | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['batch']} | {r['tok_s']:.1f} | {r['ms']:.2f} | {r['ms'] / args.layers:.3f} "
                         f"| {r['host_ms']:.2f} | {r['tok_s_synced']:.1f} | {r['ms_synced']:.2f} | {r['gib']:.2f} |")
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.rows_json:
        import json

        with open(args.rows_json, "w") as f:
            json.dump(rows, f)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
