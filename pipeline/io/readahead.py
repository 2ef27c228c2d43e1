"""Reading ahead of the tasks: the kernel is asked (``posix_fadvise(WILLNEED)``) to start
reading the stored tensors the next tasks will read, in the order the scheduler starts them,
while the tasks now running compute. Without it a task on a cold page cache faults its
tensors in when it starts, and the disk idles while the cores compute.

At most ``window`` bytes are asked for beyond what finished tasks read, so on a machine with
less RAM than the checkpoints the pages read ahead are not evicted before their task reads
them. Only a hint: a range the kernel cannot take (a filesystem without read-ahead, a file
gone) is skipped, and nothing is read in this process."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence

from .reader import TensorInfo

WINDOW = 2 << 30  # bytes asked for ahead of the finished tasks, at most (less with little RAM)


def default_window() -> int:
    """``WINDOW``, or an eighth of the machine's RAM where that is less."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return WINDOW
    return max(1, min(WINDOW, ram // 8))


def ranges(reads: Iterable[TensorInfo]) -> list[tuple[str, int, int]]:
    """(file, offset, length) of each stored tensor in ``reads`` and of its scale; tensors
    without a known offset (.pt/.bin checkpoints) have none."""
    spans = []
    for info in reads:
        for part in (info, info.scale):
            if part is not None and part.offset is not None and part.nbytes:
                spans.append((part.file, part.offset, part.nbytes))
    return spans


class ReadAhead:
    """A thread asking for each task's reads in ``plan`` ((key, tensors read), in the order
    the tasks start), staying within ``window`` bytes of the tasks ``finished``. A context
    manager: the thread stops and its descriptors are closed on exit."""

    def __init__(self, plan: Sequence[tuple[str, Sequence[TensorInfo]]], window: int):
        self.plan = [(key, ranges(reads)) for key, reads in plan]
        self.window = window
        self._bytes = {key: sum(n for _f, _o, n in spans) for key, spans in self.plan}
        self._asked = 0
        self._finished = 0
        self._stop = False
        self._changed = threading.Condition()
        self._fds: dict[str, int | None] = {}
        self._thread = threading.Thread(target=self._run, name="loraforge-readahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._changed:
            self._stop = True
            self._changed.notify()
        self._thread.join()
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)

    def finished(self, key: str) -> None:
        """Task ``key`` is done: its bytes no longer count against the window."""
        with self._changed:
            self._finished += self._bytes.get(key, 0)
            self._changed.notify()

    def _run(self) -> None:
        for key, spans in self.plan:
            with self._changed:
                while not self._stop and self._asked - self._finished >= self.window:
                    self._changed.wait()
                if self._stop:
                    return
                self._asked += self._bytes[key]
            for file, offset, length in spans:
                self._advise(file, offset, min(length, self.window))

    def _advise(self, file: str, offset: int, length: int) -> None:
        if file not in self._fds:
            try:
                self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError:
                self._fds[file] = None
        fd = self._fds[file]
        if fd is None:
            return
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:  # a hint the filesystem does not take
            pass
