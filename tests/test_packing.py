import pytest
import torch

from milo_tensor.quant.packing import (
    FORMAT_VERSION,
    pack_int3,
    pack_int3_v1,
    packed_words,
    repack_v1,
    unpack_int3,
    unpack_int3_v1,
)


SHAPES = [(1, 32), (3, 64), (5, 96), (2, 3, 160), (7, 4096), (4, 2, 1, 32), (0, 64), (2, 0, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape, gen):
    codes = torch.randint(0, 8, shape, generator=gen, dtype=torch.uint8)
    for pack, unpack in ((pack_int3, unpack_int3), (pack_int3_v1, unpack_int3_v1)):
        words = pack(codes)
        assert words.dtype == torch.int32
        assert words.shape == (*shape[:-1], shape[-1] * 3 // 32)
        assert torch.equal(unpack(words), codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_repack_v1_gives_the_v2_words_of_the_same_codes(shape, gen):
    codes = torch.randint(0, 8, shape, generator=gen, dtype=torch.uint8)
    v1, v2 = pack_int3_v1(codes), pack_int3(codes)
    assert torch.equal(repack_v1(v1), v2)
    if codes.numel():
        assert not torch.equal(v1, v2)  # the layouts differ: a loader that skipped repacking would be caught
    # every int32 word pattern is a valid format-1 chunk: repacking keeps its codes
    words = torch.randint(-(2**31), 2**31, (*shape[:-1], shape[-1] * 3 // 32), generator=gen, dtype=torch.int64)
    words = words.to(torch.int32)
    assert torch.equal(unpack_int3(repack_v1(words)), unpack_int3_v1(words))


# ---- the layouts, written out bit by bit from docs/format.md / packing.py's docstring with Python ints

# format 2: pair p = codes (2p, 2p + 1) -> (word, 3-bit field); code 2p in bits 3i..3i+2 of the low
# half, code 2p + 1 in bits 16+3i..16+3i+2 of the high half
V2_PAIRS = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (0, 3), 4: (0, 4),
            5: (1, 0), 6: (1, 1), 7: (1, 2),
            8: (2, 0), 9: (2, 1), 10: (2, 2), 11: (2, 3), 12: (2, 4),
            13: (1, 3), 14: (1, 4)}


def _v2_bit_places() -> dict[tuple[int, int], tuple[int, int]]:
    """(code j of a chunk, bit b of the code) -> (word m of the chunk, bit position in word m)."""
    places = {}
    for p, (m, i) in V2_PAIRS.items():
        for b in range(3):
            places[(2 * p, b)] = (m, 3 * i + b)
            places[(2 * p + 1, b)] = (m, 16 + 3 * i + b)
    for b in range(3):  # pair 15: bit b of code 30 in bit 15 of word b, of code 31 in bit 31 of word b
        places[(30, b)] = (b, 15)
        places[(31, b)] = (b, 31)
    return places


def _v1_bit_places() -> dict[tuple[int, int], tuple[int, int]]:
    """Format 1: words 0 / 1 hold the low 2 bits of codes 0..15 / 16..31 at bits 2j, 2j + 1; word 2
    holds bit 2 of code j at bit j."""
    places = {}
    for j in range(32):
        places[(j, 0)] = (j // 16, 2 * (j % 16))
        places[(j, 1)] = (j // 16, 2 * (j % 16) + 1)
        places[(j, 2)] = (2, j)
    return places


def _signed(w: int) -> int:
    return w - (1 << 32) if w >= 1 << 31 else w


def _reference_words(row: list[int], places) -> list[int]:
    words = []
    for c in range(len(row) // 32):
        chunk, w = row[32 * c : 32 * c + 32], [0, 0, 0]
        for (j, b), (m, bit) in places.items():
            w[m] |= ((chunk[j] >> b) & 1) << bit
        words += [_signed(x) for x in w]
    return words


def _reference_codes(words: list[int], places) -> list[int]:
    codes = []
    for c in range(len(words) // 3):
        w = [x & 0xFFFFFFFF for x in words[3 * c : 3 * c + 3]]
        chunk = [0] * 32
        for (j, b), (m, bit) in places.items():
            chunk[j] |= ((w[m] >> bit) & 1) << b
        codes += chunk
    return codes


@pytest.mark.parametrize("version", [2, 1])
def test_layout_matches_documentation(version, gen):
    places = _v2_bit_places() if version == 2 else _v1_bit_places()
    pack, unpack = (pack_int3, unpack_int3) if version == 2 else (pack_int3_v1, unpack_int3_v1)
    # the table places each of the 96 bits of a chunk exactly once
    assert len(places) == 96 and sorted(places.values()) == [(m, bit) for m in range(3) for bit in range(32)]
    codes = torch.randint(0, 8, (4, 128), generator=gen, dtype=torch.uint8)
    words = pack(codes)
    for r in range(codes.shape[0]):
        assert words[r].tolist() == _reference_words(codes[r].tolist(), places)
    # and any words (every bit pattern) read back as the table says
    words = torch.randint(-(2**31), 2**31, (4, 12), generator=gen, dtype=torch.int64).to(torch.int32)
    codes = unpack(words)
    for r in range(words.shape[0]):
        assert codes[r].tolist() == _reference_codes(words[r].tolist(), places)


def test_v2_pairs_are_neighbours_in_one_word():
    """What the layout is for: codes 2p and 2p + 1 of pairs 0..14 sit in one word, 16 bits apart."""
    places = _v2_bit_places()
    for p in range(15):
        for b in range(3):
            (m0, bit0), (m1, bit1) = places[(2 * p, b)], places[(2 * p + 1, b)]
            assert m0 == m1 and bit1 == bit0 + 16
    # a single code set in a chunk of zeros lands where the table says
    for j in range(32):
        codes = torch.zeros(1, 32, dtype=torch.uint8)
        codes[0, j] = 5  # bits 0 and 2
        words = [w & 0xFFFFFFFF for w in pack_int3(codes)[0].tolist()]
        expected = [0, 0, 0]
        for b in (0, 2):
            m, bit = places[(j, b)]
            expected[m] |= 1 << bit
        assert words == expected, j


def test_slices_of_whole_chunks_are_valid_rows(gen):
    codes = torch.randint(0, 8, (3, 192), generator=gen, dtype=torch.uint8)
    words = pack_int3(codes)
    assert torch.equal(unpack_int3(words[:, 3:9].contiguous()), codes[:, 32:96])


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int3(torch.zeros(2, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_int3(torch.full((1, 32), 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer codes"):
        pack_int3(torch.rand(1, 32))
    with pytest.raises(ValueError, match="int32"):
        unpack_int3(torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of 3"):
        unpack_int3(torch.zeros(1, 4, dtype=torch.int32))


def test_sizes():
    assert packed_words(4096) == 384
    assert FORMAT_VERSION == 2
