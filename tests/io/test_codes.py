"""io/codes.py: sign codes at one bit per code bit, in the packed format's layout."""

from __future__ import annotations

import pytest
import torch

from liftq_cli.errors import BadInputError
from liftq_cli.io.codes import CHUNK_BITS, pack_codes, unpack_codes
from liftq_kernels.reference import pack_bits


def test_codes_pack_and_unpack_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    for out, slices, D in [(1, 1, 9), (7, 13, 24), (3, 4, 32), (0, 3, 10)]:
        codes = torch.rand(out, slices, D, generator=g) > 0.5
        words = pack_codes(codes)
        assert words.dtype == torch.int32 and words.shape == (out, -(-slices * D // 32))
        assert torch.equal(unpack_codes(words, slices, D), codes)
    with pytest.raises(BadInputError, match="expected int32"):
        unpack_codes(torch.zeros(2, 5, dtype=torch.int32), 13, 24, "x.codes")


def test_chunked_packing_is_the_format_layout(monkeypatch):
    import liftq_cli.io.codes as codes_module

    codes = torch.rand(9, 5, 24, generator=torch.Generator().manual_seed(3)) > 0.5
    whole = pack_bits(codes.reshape(9, -1))
    monkeypatch.setattr(codes_module, "CHUNK_BITS", 240)  # two rows per chunk
    assert torch.equal(pack_codes(codes), whole) and CHUNK_BITS > 240
    assert torch.equal(unpack_codes(whole, 5, 24), codes)
