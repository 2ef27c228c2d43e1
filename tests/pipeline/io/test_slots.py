"""The checksum a slot's bytes are recorded with, from a view, a slice of one or bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraforge.pipeline.io.layout import OutputEntry, Slot
from loraforge.pipeline.io.slots import checksum, slot_checksum, write_at

CHECK = b"123456789"  # the standard check input: CRC-32 0xCBF43926, CRC-32C 0xE3069283
CRC = {True: 0xCBF43926, False: 0xE3069283}


@pytest.mark.parametrize("zip_crc", [True, False], ids=["crc32", "crc32c"])
def test_a_sliced_view_is_checksummed_by_its_own_bytes(zip_crc):
    view = memoryview(np.frombuffer(b"ab" + CHECK + b"yz", np.uint8))[2:-2]
    assert checksum(view, zip_crc) == CRC[zip_crc]
    assert checksum(view[4:], zip_crc, checksum(view[:4], zip_crc)) == CRC[zip_crc]
    assert checksum(CHECK, zip_crc) == CRC[zip_crc]


@pytest.mark.parametrize("zip_crc", [True, False], ids=["crc32", "crc32c"])
def test_a_slots_bytes_read_back_have_the_checksum_written(tmp_path, zip_crc):
    file = tmp_path / "out.bin"
    file.write_bytes(bytes(4 + len(CHECK)))
    slot = Slot(str(file), 4, OutputEntry("t", "U8", (len(CHECK),)), zip_crc)
    assert write_at(slot, torch.frombuffer(bytearray(CHECK), dtype=torch.uint8)) == CRC[zip_crc]
    assert slot_checksum(slot) == CRC[zip_crc]
