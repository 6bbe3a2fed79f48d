"""Train the tiny byte-level Mixtral shipped in milo_tensor/assets/tiny_moe.

The project cannot download weights, and quantization methods are only meaningfully compared on
*trained* weights (random ones have none of the outliers and structure 3 bits struggle with), so
it trains its own: a Mixtral-architecture model (8 experts, top-2, every dim a multiple of 128 so
all group sizes apply) on CPython's documentation (milo_tensor.data), on a CPU, in about 20 minutes.

    python scripts/train_tiny_moe.py --out milo_tensor/assets/tiny_moe

The result is deterministic for a seed and thread count up to floating-point reduction order.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import MixtralConfig, MixtralForCausalLM

from milo_tensor.data import corpus_text, encode, perplexity, write_heldout_snapshot


def tiny_moe_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def batches(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    """Random windows of the training stream, forever."""
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("milo_tensor/assets/tiny_moe"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=32768)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_ids, heldout_ids = encode(corpus_text("train")), encode(corpus_text("heldout"))
    print(f"train {train_ids.numel():,} bytes, held-out {heldout_ids.numel():,} bytes")

    config = tiny_moe_config()
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    data = batches(train_ids, args.batch, args.seq_len, torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = next(data)
        out = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}")
    minutes = (time.perf_counter() - start) / 60
    model.eval()
    model = model.to(torch.bfloat16)
    ppl = perplexity(model.float(), heldout_ids, max_tokens=args.eval_tokens)
    print(f"held-out perplexity (float32 of the bf16 weights, {args.eval_tokens} bytes): {ppl:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    write_heldout_snapshot(args.out / "heldout.txt.gz")
    card = {
        "architecture": "MixtralForCausalLM, byte-level (vocab 256)",
        "parameters": n_params,
        "corpus": "milo_tensor.data: pydoc_data topics + stdlib docstrings, 1/10 of documents held out",
        "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "seed": args.seed,
        "train_minutes": round(minutes, 1), "threads": args.threads,
        "heldout_perplexity": round(ppl, 4), "heldout_tokens": args.eval_tokens,
        "torch": torch.__version__, "python": platform.python_version(),
    }
    (args.out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
