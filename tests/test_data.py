"""The shipped corpus, byte tokenizer and perplexity, and the shipped trained tiny MoE."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from milo_tensor.cli_demo import TINY_MOE
from milo_tensor.data import (
    corpus_documents, corpus_text, decode, encode, heldout_snapshot, perplexity, write_heldout_snapshot,
)
from milo_tensor.evaluation import load_float_model
from models import tiny_moe


def test_corpus_splits_are_disjoint_and_sized():
    train, heldout = corpus_documents("train"), corpus_documents("heldout")
    train_names = {name for name, _ in train}
    assert train_names.isdisjoint(name for name, _ in heldout)
    share = len(heldout) / (len(train) + len(heldout))
    assert 0.05 < share < 0.2, share  # one document in ten
    assert len(corpus_text("heldout").encode()) > 100_000
    assert corpus_documents("train") == train  # fixed order: the same bytes every call
    with pytest.raises(ValueError, match="unknown split"):
        corpus_documents("test")


def test_encode_decode_round_trip(gen):
    codepoints = torch.randint(32, 0x2FFF, (500,), generator=gen).tolist()
    text = "".join(chr(c) for c in codepoints if not 0xD800 <= c < 0xE000)
    ids = encode(text)
    assert ids.dtype == torch.long and int(ids.min()) >= 0 and int(ids.max()) < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text


def _reference_perplexity(model, ids, seq_len):
    """float64 log-softmax over each full window, token by token in Python (eager experts: the
    grouped_mm path has no float64)."""
    model.config._experts_implementation = "eager"
    model = model.double()
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                nll -= float(logp[t, window[t + 1]])
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_float64_reference(gen):
    model = tiny_moe("mixtral", seed=3)
    ids = torch.randint(0, 256, (3 * 32 + 7,), generator=gen)  # a partial window is dropped
    got = perplexity(model.float(), ids, seq_len=32, batch_size=2)
    want = _reference_perplexity(model, ids, 32)
    assert got == pytest.approx(want, rel=1e-4)
    assert perplexity(model.float(), ids, seq_len=32, max_tokens=64) == pytest.approx(
        _reference_perplexity(model, ids[:64], 32), rel=1e-4
    )
    with pytest.raises(ValueError, match="1D tensor"):
        perplexity(model, ids.view(1, -1))


def test_shipped_tiny_moe_is_the_trained_model_its_card_describes():
    weights = TINY_MOE / "model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    card = json.loads((TINY_MOE / "training.json").read_text())
    config = json.loads((TINY_MOE / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["vocab_size"] == 256
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    with safe_open(weights, "pt") as f:
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == card["parameters"]
    model = load_float_model(TINY_MOE).float()
    ids = encode(heldout_snapshot())
    # Trained: far below the 256 of a uniform byte model, and the figure the card records.
    assert perplexity(model, ids, max_tokens=card["heldout_tokens"]) == pytest.approx(
        card["heldout_perplexity"], rel=0.01
    )


def test_heldout_snapshot_round_trip_and_errors(tmp_path):
    path = tmp_path / "heldout.txt.gz"
    write_heldout_snapshot(path)
    first = path.read_bytes()
    assert heldout_snapshot(path) == corpus_text("heldout")
    write_heldout_snapshot(path)
    assert path.read_bytes() == first  # deterministic bytes (gzip mtime 0)
    path.write_bytes(first[: len(first) // 2])
    with pytest.raises(ValueError, match="cannot read the held-out snapshot"):
        heldout_snapshot(path)
    with pytest.raises(ValueError, match="cannot read the held-out snapshot"):
        heldout_snapshot(tmp_path / "missing.txt.gz")


def test_shipped_snapshot_is_heldout_text():
    """The shipped held-out bytes are text the model was not trained on: no 200-byte window of it
    sampled at random occurs in the training split more often than the known shared-docstring rate."""
    text, train = heldout_snapshot(), corpus_text("train")
    assert len(text.encode()) > 100_000
    rng = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(text) - 200, (100,), generator=rng).tolist()
    leaked = sum(text[s : s + 200] in train for s in starts)
    assert leaked <= 15, leaked
