"""A ``torch.save`` zip checkpoint written as a stream: the same slots as the safetensors
writer, inside an archive laid out up front."""

from __future__ import annotations

import os
import struct
import zlib

import torch

from ..errors import OutputError
from . import safetensors_format as stf
from .atomic import make_parent, remove_quietly, temporary_name
from .layout import OutputEntry, Slot
from .slots import Slots


class PytorchOutput:
    """A ``torch.save`` zip checkpoint written without holding its tensors: ``torch.save`` lays
    out the archive under ``torch.serialization.skip_data`` from never-touched ``torch.empty``
    placeholders (virtual memory only), then each tensor's bytes are written into its storage
    record and the zip CRCs patched, so ``torch.load`` and ``zipfile`` both accept the file."""

    def __init__(self, output: str, entries: list[OutputEntry], reuse: bool = False):
        from torch.serialization import skip_data

        self.files = [output]
        self._tmp = temporary_name(output)
        self.reused: set[str] = set()
        if reuse and _holds_placeholders(self._tmp, entries):
            self.reused.add(output)
        else:
            placeholders = {
                e.name: torch.empty(e.shape, dtype=stf.DTYPE_BY_CODE[e.dtype]) for e in entries
            }
            try:
                make_parent(self._tmp)
                with skip_data():
                    torch.save(placeholders, self._tmp)
            except OSError as e:
                remove_quietly(self._tmp)
                raise OutputError(
                    f"cannot write here ({e.strerror})",
                    path=output,
                    hint="choose a writable --output location",
                ) from None
            del placeholders
        self._fd = os.open(self._tmp, os.O_RDWR)
        self._records = _storage_records(self._tmp, len(entries))
        self._slots = Slots()
        self._crc: dict[int, int] = {}
        for i, entry in enumerate(entries):
            self._slots.add(self._fd, self._records[i][0], entry)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        begin, data = self._slots.write(name, tensor)
        self._crc[begin] = zlib.crc32(data)

    def slot(self, name: str) -> Slot:
        """Where ``name`` goes, for a writer elsewhere (``write_at``: the zip record's CRC-32)."""
        _fd, begin, entry = self._slots.where[name]
        return Slot(self._tmp, begin, entry, zip_crc=True)

    def final_file(self, name: str) -> str:
        return self.files[0]

    def mark_written(self, name: str, crc: int) -> None:
        """Record that ``name``'s bytes, of CRC-32 ``crc``, were written through its ``slot``."""
        self._crc[self._slots.where[name][1]] = crc
        self._slots.missing.discard(name)

    def close(self) -> None:
        """Close the temporary but keep it, so an interrupted run can be resumed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def final_files(self) -> list[str]:
        return list(self.files)

    @property
    def temporaries(self) -> list[str]:
        return [self._tmp] if os.path.exists(self._tmp) else []

    def seal(self) -> None:
        """Check every tensor arrived, patch the zip CRCs, make the temporary durable."""
        self._slots.check_complete()
        for begin, local_header, central in self._records:
            crc = struct.pack("<I", self._crc.get(begin, 0))
            os.pwrite(self._fd, crc, local_header + 14)
            os.pwrite(self._fd, crc, central + 16)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def publish(self) -> list[str]:
        os.replace(self._tmp, self.files[0])
        return list(self.files)

    def commit(self) -> list[str]:
        self.seal()
        return self.publish()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        remove_quietly(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def _holds_placeholders(path: str, entries: list[OutputEntry]) -> bool:
    """Whether ``path`` is a ``torch.save`` skeleton of exactly ``entries`` (names in order,
    dtypes, shapes): what ``PytorchOutput`` would lay out, so it can be kept on resume."""
    if not os.path.isfile(path):
        return False
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # any unreadable leftover is simply laid out again
        return False
    if not isinstance(state, dict):
        return False
    found = [(k, stf.CODE_BY_DTYPE.get(v.dtype), tuple(v.shape)) for k, v in state.items()]
    return found == [(e.name, e.dtype, e.shape) for e in entries]


def _storage_records(path: str, count: int) -> list[tuple[int, int, int]]:
    """(data offset, local header offset, central directory record offset) of storages
    ``data/0`` … ``data/{count-1}``, which ``torch.save`` numbers in dict order."""
    import zipfile

    found: dict[int, tuple[int, int, int]] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        central = archive.start_dir
        for info in archive.infolist():
            f.seek(central)
            record = f.read(46)
            name_len, extra_len, comment_len = struct.unpack("<HHH", record[28:34])
            parent, _, leaf = info.filename.rpartition("/")
            if parent.endswith("/data") and leaf.isdigit():
                f.seek(info.header_offset)
                local = f.read(30)
                n, m = struct.unpack("<HH", local[26:30])
                found[int(leaf)] = (info.header_offset + 30 + n + m, info.header_offset, central)
            central += 46 + name_len + extra_len + comment_len
    if sorted(found) != list(range(count)):
        raise RuntimeError(f"{path}: expected {count} storage records, found {len(found)}")
    return [found[i] for i in range(count)]
