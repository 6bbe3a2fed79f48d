"""The one definition of how 3-bit codes are stored (see docs/format.md).

Every reader of packed weights -- the reference op, the CUDA kernels, the checkpoint loader --
follows this layout, so it lives in exactly one place. 32 codes (one chunk along K) occupy 3
int32 words, exactly 3 bits a code. The codes go in *pairs* of neighbours (2p, 2p + 1), p = 0..15:
pair p sits in one 3-bit field i of one word m, code 2p in bits 3i..3i+2 of the low half and code
2p + 1 in bits 16+3i..16+3i+2 of the high half:

    pairs 0..4   -> word 0, fields 0..4        pairs 8..12  -> word 2, fields 0..4
    pairs 5..7   -> word 1, fields 0..2        pairs 13..14 -> word 1, fields 3..4
    pair 15 (codes 30, 31): bit b of code 30 in bit 15 of word b, bit b of code 31 in bit 31 of word b

Why: a kernel turns a pair into the two halves of one fp16/bf16 register with one AND (or one
shift and one AND-OR) of one word, where the format-1 layout (a 2-bit plane and a 1-bit plane)
took two shifts and two AND-ORs; and a pair's two halves multiply neighbouring k, so x needs no
permutation (an x word is a pair's partner). The pairs a kernel thread takes -- k 0..15 of a chunk
(words 0 and 1) or k 16..31 (words 2 and 1) -- come out of two words with the same shifts.

A row of K codes is 3K/32 words, and any slice of whole 32-code chunks along K is itself a valid
packed row (tensor-parallel splits). Format 1 (``pack_int3_v1``) is kept to read old checkpoints.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 2
CODES_PER_CHUNK = 32
WORDS_PER_CHUNK = 3
MAX_CODE = 7

# (word, field) of pairs 0..14 (docstring); pair 15 is spread over the spare bits 15 and 31
_PAIR_FIELDS = ((0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1), (1, 2),
                (2, 0), (2, 1), (2, 2), (2, 3), (2, 4), (1, 3), (1, 4))


def _code_places(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of codes 0..29 of a chunk (built per call: traceable)."""
    words, shifts = [], []
    for m, i in _PAIR_FIELDS:
        words += [m, m]
        shifts += [3 * i, 16 + 3 * i]
    return (torch.tensor(words, dtype=torch.int64, device=device),
            torch.tensor(shifts, dtype=torch.int64, device=device))


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


def _chunked_codes(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Integer codes [..., K] in [0, 7] -> int64 [..., K/32, 32], with the errors a caller can act on."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"{name} expects integer codes, got dtype {codes.dtype}")
    k = codes.shape[-1]
    check_packable_k(k)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > MAX_CODE):
        raise ValueError(f"{name} expects codes in [0, 7]")
    return c.reshape(*codes.shape[:-1], k // CODES_PER_CHUNK, CODES_PER_CHUNK)


def _chunked_words(words: torch.Tensor, name: str) -> torch.Tensor:
    """int32 words [..., 3K/32] -> their unsigned values as int64 [..., K/32, 3]."""
    if words.dtype != torch.int32:
        raise ValueError(f"{name} expects int32 words, got {words.dtype}")
    n_words = words.shape[-1]
    if n_words % WORDS_PER_CHUNK != 0:
        raise ValueError(f"a packed int3 row has a multiple of 3 words, got {n_words}")
    w = words.to(torch.int64) & 0xFFFFFFFF
    return w.reshape(*words.shape[:-1], n_words // WORDS_PER_CHUNK, WORDS_PER_CHUNK)


def pack_int3(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [0, 7] of shape [..., K] into int32 words of shape [..., 3K/32]."""
    c = _chunked_codes(codes, "pack_int3")
    word_of, shift_of = _code_places(c.device)
    placed = c[..., :30] << shift_of  # no two codes share a bit, so a sum is an OR
    spare = torch.arange(3, dtype=torch.int64, device=c.device)
    words = torch.stack([(placed * (word_of == m)).sum(-1) for m in range(WORDS_PER_CHUNK)], dim=-1)
    words = words | (((c[..., 30:31] >> spare) & 1) << 15) | (((c[..., 31:32] >> spare) & 1) << 31)
    return _to_int32_bits(words.reshape(*codes.shape[:-1], packed_words(codes.shape[-1])))


def unpack_int3(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int3`: int32 words [..., 3K/32] -> uint8 codes [..., K]."""
    w = _chunked_words(words, "unpack_int3")
    word_of, shift_of = _code_places(w.device)
    fields = (w[..., word_of] >> shift_of) & MAX_CODE
    spare = torch.arange(3, dtype=torch.int64, device=w.device)
    c30 = (((w >> 15) & 1) << spare).sum(-1, keepdim=True)
    c31 = (((w >> 31) & 1) << spare).sum(-1, keepdim=True)
    codes = torch.cat([fields, c30, c31], dim=-1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] // WORDS_PER_CHUNK * CODES_PER_CHUNK).to(torch.uint8)


# ---------------------------------------------------------------------- format 1 (read only)
# word 3c+0: bits 2j..2j+1 = low 2 bits of code 32c + j; word 3c+1: the same for code 32c + 16 + j
# (j = 0..15); word 3c+2: bit j = bit 2 of code 32c + j (j = 0..31)


def pack_int3_v1(codes: torch.Tensor) -> torch.Tensor:
    """Format-1 packing; only tests (old checkpoints) need to write it."""
    c = _chunked_codes(codes, "pack_int3_v1")
    bits = torch.arange(32, dtype=torch.int64, device=c.device)
    low, high = c & 3, c >> 2
    words = torch.stack([(low[..., :16] << 2 * bits[:16]).sum(-1), (low[..., 16:] << 2 * bits[:16]).sum(-1),
                         (high << bits).sum(-1)], dim=-1)
    return _to_int32_bits(words.reshape(*codes.shape[:-1], packed_words(codes.shape[-1])))


def unpack_int3_v1(words: torch.Tensor) -> torch.Tensor:
    """Format-1 words [..., 3K/32] -> uint8 codes [..., K]."""
    w = _chunked_words(words, "unpack_int3_v1")
    bits = torch.arange(32, dtype=torch.int64, device=w.device)
    low = torch.cat([(w[..., 0:1] >> 2 * bits[:16]) & 3, (w[..., 1:2] >> 2 * bits[:16]) & 3], dim=-1)
    codes = low | (((w[..., 2:3] >> bits) & 1) << 2)
    return codes.reshape(*words.shape[:-1], words.shape[-1] // WORDS_PER_CHUNK * CODES_PER_CHUNK).to(torch.uint8)


def repack_v1(words: torch.Tensor) -> torch.Tensor:
    """Format-1 words -> the same codes in the current layout (loading a format-1 checkpoint)."""
    return pack_int3(unpack_int3_v1(words))
