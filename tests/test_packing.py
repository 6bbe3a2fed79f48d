import pytest
import torch

from milo_tensor.quant.packing import FORMAT_VERSION, pack_int3, packed_words, unpack_int3


@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (5, 96), (2, 3, 160), (7, 4096), (4, 2, 1, 32)])
def test_round_trip(shape, gen):
    codes = torch.randint(0, 8, shape, generator=gen, dtype=torch.uint8)
    words = pack_int3(codes)
    assert words.dtype == torch.int32
    assert words.shape == (*shape[:-1], shape[-1] * 3 // 32)
    assert torch.equal(unpack_int3(words), codes)


def _reference_words(row: list[int]) -> list[int]:
    """The documented layout, written out with Python ints (independent of the vectorized code)."""
    words = []
    for c in range(len(row) // 32):
        chunk = row[32 * c : 32 * c + 32]
        w0 = sum((chunk[j] & 3) << (2 * j) for j in range(16))
        w1 = sum((chunk[16 + j] & 3) << (2 * j) for j in range(16))
        w2 = sum((chunk[j] >> 2) << j for j in range(32))
        words += [w - (1 << 32) if w >= 1 << 31 else w for w in (w0, w1, w2)]
    return words


def test_layout_matches_documentation(gen):
    codes = torch.randint(0, 8, (4, 128), generator=gen, dtype=torch.uint8)
    words = pack_int3(codes)
    for r in range(codes.shape[0]):
        assert words[r].tolist() == _reference_words(codes[r].tolist())


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
    assert FORMAT_VERSION == 1
