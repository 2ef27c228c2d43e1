"""What a verification checks against and how its verdict is reached."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class VerifyOptions:
    alpha: float = 1.0  # global multiplier of every LoRA's delta, as merge's --alpha
    max_error: float | None = None  # total relative error above which the run fails
    worst: int = 10  # tensors listed as the worst in the summary

    def __post_init__(self):
        if not math.isfinite(self.alpha):
            raise UsageError(f"--alpha must be finite, got {self.alpha}")
        if self.max_error is not None and not self.max_error >= 0.0:
            raise UsageError(f"--max-error must be >= 0, got {self.max_error}")
        if self.worst < 0:
            raise UsageError(f"--worst must be >= 0, got {self.worst}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
