"""The one definition of how 3-bit codes are stored (see docs/format.md).

Every reader of packed weights -- the reference op, the CUDA kernel, the checkpoint loader --
follows this layout, so it lives in exactly one place. Codes are split into a 2-bit plane and
a 1-bit plane (as the MiLo/Marlin kernels want them: the low plane dequantizes with one
mask-and-or per pair of halves, the high bit with one more), 32 codes per 3 int32 words:

    word 3c+0: bits 2j..2j+1 = low 2 bits of code 32c + j        (j = 0..15)
    word 3c+1: bits 2j..2j+1 = low 2 bits of code 32c + 16 + j   (j = 0..15)
    word 3c+2: bit  j        = bit 2 of code 32c + j             (j = 0..31)

so a row of K codes is exactly 3K/32 int32 words (3 bits per weight, no padding), and any
slice of whole 32-code chunks along K is itself a valid packed row (tensor-parallel splits).
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
CODES_PER_CHUNK = 32
WORDS_PER_CHUNK = 3
MAX_CODE = 7


def _shifts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit offsets of the 2-bit fields and of the single bits (built per call: traceable)."""
    bits = torch.arange(32, dtype=torch.int64, device=device)
    return bits[:16] * 2, bits


def packed_words(k: int) -> int:
    """Number of int32 words that hold one packed row of ``k`` codes."""
    check_packable_k(k)
    return k // CODES_PER_CHUNK * WORDS_PER_CHUNK


def check_packable_k(k: int) -> None:
    if k % CODES_PER_CHUNK != 0:
        raise ValueError(
            f"int3 packing needs the inner dimension to be a multiple of {CODES_PER_CHUNK}, got {k}; "
            f"pad the weight's input dimension or pick a layer whose in_features is a multiple of 32"
        )


def _to_int32_bits(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 bit patterns."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [0, 7] of shape [..., K] into int32 words of shape [..., 3K/32]."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"pack_int3 expects integer codes, got dtype {codes.dtype}")
    k = codes.shape[-1]
    check_packable_k(k)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > MAX_CODE):
        raise ValueError("pack_int3 expects codes in [0, 7]")
    c = c.reshape(*codes.shape[:-1], k // CODES_PER_CHUNK, CODES_PER_CHUNK)
    low = c & 3
    high = c >> 2
    shifts_low, shifts_bit = _shifts(c.device)
    w0 = (low[..., :16] << shifts_low).sum(-1)
    w1 = (low[..., 16:] << shifts_low).sum(-1)
    w2 = (high << shifts_bit).sum(-1)
    words = torch.stack([w0, w1, w2], dim=-1).reshape(*codes.shape[:-1], packed_words(k))
    return _to_int32_bits(words)


def unpack_int3(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int3`: int32 words [..., 3K/32] -> uint8 codes [..., K]."""
    if words.dtype != torch.int32:
        raise ValueError(f"unpack_int3 expects int32 words, got {words.dtype}")
    n_words = words.shape[-1]
    if n_words % WORDS_PER_CHUNK != 0:
        raise ValueError(f"a packed int3 row has a multiple of 3 words, got {n_words}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(*words.shape[:-1], n_words // WORDS_PER_CHUNK, WORDS_PER_CHUNK)
    shifts_low, shifts_bit = _shifts(w.device)
    low0 = (w[..., 0:1] >> shifts_low) & 3
    low1 = (w[..., 1:2] >> shifts_low) & 3
    high = (w[..., 2:3] >> shifts_bit) & 1
    codes = torch.cat([low0, low1], dim=-1) | (high << 2)
    k = n_words // WORDS_PER_CHUNK * CODES_PER_CHUNK
    return codes.reshape(*words.shape[:-1], k).to(torch.uint8)
