"""What decides an extraction's numbers and output: frozen, unknown fields refused, and
round-tripping through plain dicts so they can be hashed for resume and stored in reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from loraforge.kernels import SVD_METHODS, SvdSettings

from ..errors import UsageError
from ..export.options import LoraOutput


class _Frozen:
    """Mixin: ``to_dict``/``from_dict`` with unknown fields refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**data)


@dataclass(frozen=True)
class KernelOptions(SvdSettings, _Frozen):
    """Everything that decides the numbers of a low-rank factorisation: the method, the rank,
    and the kernel's ``SvdSettings`` (``--oversample``, ``--power-iterations``, ``--svd-tol``,
    ``--max-power-iterations``, ``--sketch-precision``), which it is, so it goes to the kernel
    as it is."""

    method: str = "randomized"
    rank: int = 32

    NAMES: ClassVar[dict[str, str]] = {
        "oversample": "--oversample",
        "n_iter": "--power-iterations",
        "tol": "--svd-tol",
        "max_iter": "--max-power-iterations",
        "sketch": "--sketch-precision",
    }

    def __post_init__(self):
        if self.rank < 1:
            raise UsageError(f"--rank must be >= 1, got {self.rank}")
        if self.method not in SVD_METHODS:
            raise UsageError(f"unknown --svd {self.method!r}; valid: {', '.join(SVD_METHODS)}")
        try:
            super().__post_init__()  # SvdSettings' checks, under these option names
        except ValueError as e:
            raise UsageError(str(e)) from None


@dataclass(frozen=True, kw_only=True)
class ExtractOptions(LoraOutput, _Frozen):
    """What decides an extraction's output: the kernel, which tensors are factored, and how the
    LoRA is written (``LoraOutput``). The rank rule and the output options are applied at
    export from the stored spectra, so they are not part of what a resume compares
    (``resume.py``)."""

    kernel: KernelOptions = KernelOptions()
    lowrank_min_params: int = 1_000_000
    diff_only: bool = False

    def __post_init__(self):
        if isinstance(self.kernel, dict):
            object.__setattr__(self, "kernel", KernelOptions.from_dict(self.kernel))
        self.check_output(self.kernel.rank, "kernel rank")
        if self.lowrank_min_params < 0:
            raise UsageError("--lowrank-min-params must be >= 0")
