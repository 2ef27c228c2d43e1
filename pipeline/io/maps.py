"""Memory maps of checkpoint files, cached per process (every Dask worker fills its own), and
their pages: dropped from the process once a tensor is read (``MADV_DONTNEED``: they stay in
the page cache) or faulted in ahead of a hash (``MADV_POPULATE_READ``)."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import re
import threading
import zipfile

import torch

from ..errors import CheckpointFormatError, UnsafePickle

_PAGE = mmap.PAGESIZE

# ---- per-process caches of open maps; every Dask worker fills its own ----
_lock = threading.Lock()
_maps: dict[str, tuple[tuple[int, int, int], mmap.mmap]] = {}
_pickles: dict[str, tuple[tuple[int, int, int], dict[str, torch.Tensor]]] = {}


def _stamp(file: str) -> tuple[int, int, int]:
    """Identity of a file's current contents: a rewritten file gets a new map."""
    st = os.stat(file)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def file_map(file: str) -> mmap.mmap:
    """``file`` mapped read-only, once per process (again after the file is rewritten)."""
    stamp = _stamp(file)
    with _lock:
        cached = _maps.get(file)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _maps[file] = (stamp, mm)
        return mm


def pytorch_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch zip checkpoint, memory-mapped (``torch.load(mmap=True,
    weights_only=True)``, ``state_dict``/``model`` unwrapped), once per process."""
    stamp = _stamp(path)
    with _lock:
        cached = _pickles.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            "not a zip-format PyTorch checkpoint, so it cannot be memory-mapped",
            path=path,
            hint="re-save it with a current torch.save, or convert it to safetensors",
        )
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message is several lines with terminal escapes; name what it refused.
        needs = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it calls {needs.group(1)}" if needs else "it is not a plain state dict"
        raise UnsafePickle(
            f"refusing a pickle that needs code to load ({what})",
            path=path,
            hint="convert it to safetensors in a trusted environment",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointFormatError(
            f"cannot read PyTorch checkpoint ({str(e)[:160]})", path=path
        ) from None
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"holds a {type(obj).__name__}, not a state dict", path=path)
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    with _lock:
        _pickles[path] = (stamp, state)
    return state


def _drop_pages(address: int, length: int) -> None:
    """Unmap the touched pages of a read-only file mapping from this process (they stay in the
    page cache); the next access simply faults them in again."""
    start = address - address % _PAGE
    _libc().madvise(
        ctypes.c_void_p(start),
        ctypes.c_size_t(address + length - start),
        ctypes.c_int(mmap.MADV_DONTNEED),
    )


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _LIBC


def release(view: torch.Tensor) -> None:
    """Drop a mapped view's pages from the process (a row block read, say); reading it again
    faults them back in from the page cache."""
    if view.numel() == 0 or view.device.type != "cpu":
        return
    if view.is_contiguous():
        _drop_pages(view.data_ptr(), view.numel() * view.element_size())


_MADV_POPULATE_READ = 22  # Linux 5.14+


def prefault(view: torch.Tensor) -> None:
    """Fault a mapped view's pages in (``MADV_POPULATE_READ``) through ctypes, which releases
    the GIL: a hash over the view then runs at memory speed, and threads reading other tensors
    go on meanwhile. Where the kernel lacks it (or ``view`` is not mapped) this does nothing and
    the pages fault in as they are read."""
    if view.numel() == 0 or not view.is_contiguous() or view.device.type != "cpu":
        return
    address = view.data_ptr()
    start = address - address % _PAGE
    _libc().madvise(
        ctypes.c_void_p(start),
        ctypes.c_size_t(address + view.numel() * view.element_size() - start),
        ctypes.c_int(_MADV_POPULATE_READ),
    )
