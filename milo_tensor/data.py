"""Text every Python installation has, as a byte-level corpus, and perplexity on it.

No dataset can be downloaded where this project is built and tested, so the shipped tiny MoE is
trained and scored on CPython's own documentation: the ``pydoc_data`` topic pages and the
docstrings of the standard library. Documents are split train/held-out by a stable hash of their
name. The split is by document, not by text: a few stdlib modules share docstring passages (about
5% of 300-byte held-out windows also occur in the training text), which lowers every method's
absolute perplexity alike and leaves comparisons between quantizers fair.

The corpus bytes depend on the Python version (docstrings change between releases), so the
training script stores the held-out text it scored the shipped model on next to the weights
(``assets/tiny_moe/heldout.txt.gz``, ~90 KB); :func:`heldout_snapshot` reads it, which makes
the demo's perplexities the same on every interpreter and skips parsing the standard library.
"""

from __future__ import annotations

import ast
import functools
import gzip
import math
import os
import tempfile
from pathlib import Path
import sysconfig
import zlib
from typing import Iterator, Literal

import torch
from torch import nn

__all__ = [
    "corpus_documents", "corpus_text", "heldout_snapshot", "write_heldout_snapshot", "encode", "decode", "perplexity",
    "HELDOUT_FRACTION", "HELDOUT_SNAPSHOT",
]

Split = Literal["train", "heldout"]
HELDOUT_FRACTION = 10  # one document in ten is held out
HELDOUT_SNAPSHOT = Path(__file__).parent / "assets" / "tiny_moe" / "heldout.txt.gz"
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"topic:{name}", topics[name]


def _stdlib_docstrings() -> Iterator[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, filename)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a few stdlib files are templates or use other encodings
            docs = [
                doc
                for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and (doc := ast.get_docstring(node))
            ]
            if docs:
                yield f"stdlib:{os.path.relpath(path, root)}", "\n\n".join(docs)


def _split_of(name: str) -> Split:
    return "heldout" if zlib.crc32(name.encode()) % HELDOUT_FRACTION == 0 else "train"


@functools.lru_cache(maxsize=None)
def corpus_documents(split: Split) -> tuple[tuple[str, str], ...]:
    """(name, text) of every document of ``split``, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    docs = [*_pydoc_topics(), *_stdlib_docstrings()]
    return tuple((name, text) for name, text in docs if _split_of(name) == split)


def corpus_text(split: Split) -> str:
    """All documents of ``split`` joined by blank lines."""
    return "\n\n".join(text for _, text in corpus_documents(split))


def write_heldout_snapshot(path: Path = HELDOUT_SNAPSHOT) -> None:
    """Store this interpreter's held-out text, gzipped (mtime 0: the same bytes every time), atomically."""
    data = gzip.compress(corpus_text("heldout").encode("utf-8"), compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
    os.replace(tmp.name, path)


def heldout_snapshot(path: Path = HELDOUT_SNAPSHOT) -> str:
    """The held-out text the shipped model was scored on (see the module docstring)."""
    try:
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"cannot read the held-out snapshot {path} ({exc}); reinstall the package or rebuild it with "
            f"scripts/train_tiny_moe.py, or score on corpus_text('heldout') instead"
        ) from exc


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes as token ids 0..255 (the tiny MoE's whole tokenizer)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seq_len: int = 256,
    max_tokens: int | None = None,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens.

    Windows are independent (no carried context), so every method is scored on exactly the same
    predictions; the first token of each window is context only.
    """
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"ids must be a 1D tensor of at least 2 tokens, got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = max(ids.numel() // seq_len, 1)
    windows = ids[: n_windows * seq_len].view(n_windows, -1) if ids.numel() >= seq_len else ids.view(1, -1)
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)
