"""A matrix that is never held whole: ``RowBlocks`` reads it a block of rows at a time and
gives the randomized SVD (``randomized_svd_op``) the products it needs, so a delta larger
than memory is factored in O((m + n)·q) plus one block.

Each pass over the rows (A·X, Aᵀ·Y, Qᵀ·A, the residual) calls ``read(start, stop)`` for every
block; the caller builds the block (e.g. ``target − base`` from memory maps) and may reuse one
buffer for all of them. Results equal the dense operator's up to summation order: a row block
of A·X is the same rows of the dense product, while Aᵀ·Y and Qᵀ·A add the blocks' partial
products in row order. The squared norm is accumulated in fp64 per block (see ``squared_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .svd import squared_norm


class RowBlocks:
    """The ``m×n`` fp32 matrix whose rows ``start:stop`` are ``read(start, stop)`` (on
    ``device``), in blocks of ``block_rows`` rows."""

    def __init__(
        self,
        read: Callable[[int, int], torch.Tensor],
        shape: tuple[int, int],
        block_rows: int,
        device: torch.device | str = "cpu",
    ):
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.read = read
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_rows = block_rows
        self.device = torch.device(device)
        self.passes = 0  # full reads of the matrix so far
        self._sq_norm: float | None = None
        self._max_abs: float | None = None

    @property
    def blocks(self) -> int:
        return math.ceil(self.shape[0] / self.block_rows)

    def _rows(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        self.passes += 1
        m = self.shape[0]
        for start in range(0, m, self.block_rows):
            stop = min(start + self.block_rows, m)
            yield start, stop, self.read(start, stop)

    def _stats(self) -> None:
        """One pass for ‖A‖² (fp64) and max |entry| (NaN when any entry is)."""
        sq, largest = 0.0, 0.0
        for _start, _stop, block in self._rows():
            sq += squared_norm(block)
            if block.numel():
                low, high = torch.aminmax(block)
                peak = max(-float(low), float(high))
                largest = peak if math.isnan(peak) else max(largest, peak)
                if math.isnan(largest):
                    break
        self._sq_norm, self._max_abs = sq, largest

    def sq_norm(self) -> float:
        if self._sq_norm is None:
            self._stats()
        return self._sq_norm

    def max_abs(self) -> float:
        if self._max_abs is None:
            self._stats()
        return self._max_abs

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """A·X, block by block into the rows of one result."""
        out = torch.empty(self.shape[0], x.shape[1], dtype=torch.float32, device=self.device)
        for start, stop, block in self._rows():
            torch.mm(block, x, out=out[start:stop])
        return out

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀ·Y as the sum of the blocks' Aᵢᵀ·Yᵢ."""
        out = torch.zeros(self.shape[1], y.shape[1], dtype=torch.float32, device=self.device)
        for start, stop, block in self._rows():
            out.addmm_(block.T, y[start:stop])
        return out

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        """Qᵀ·A (q×n) as the sum of the blocks' Qᵢᵀ·Aᵢ."""
        out = torch.zeros(basis.shape[1], self.shape[1], dtype=torch.float32, device=self.device)
        for start, stop, block in self._rows():
            out.addmm_(basis[start:stop].T, block)
        return out

    def lowered(self, dtype: torch.dtype) -> None:
        """None: a lowered copy would be a second matrix the size of A, which this operator
        exists not to hold, so every pass runs in fp32."""
        return None

    def residual_sq(self, up: torch.Tensor, down: torch.Tensor, captured: float) -> float:
        """‖A − up·down‖²: ‖A‖² − Σσᵢ² unless that cancels (under 0.1% of ‖A‖², see
        ``svd.residual_sq``), then measured in one more pass."""
        sq_norm = self.sq_norm()
        cheap = sq_norm - captured
        if cheap > 1e-3 * sq_norm:
            return cheap
        return sum(
            squared_norm(block - up[start:stop] @ down) for start, stop, block in self._rows()
        )
