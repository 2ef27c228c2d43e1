"""``inspect``: plan from headers, one norm per module, and a report as plain data (the console
renders it, ``--json`` prints it). Read-only: it opens files for reading and writes nothing."""

from __future__ import annotations

import math
from collections import Counter

from ..lora.clients import LoraFile, client_loadings, judges
from .plan import InspectPlan, module_naming, namings, plan_inspect
from .task import Workspace, delta_norm


def inspect_lora(
    path: str,
    base: str | None = None,
    lora_type: str | None = None,
    base_type: str | None = None,
) -> dict:
    """What the LoRA at ``path`` holds; with ``base``, what it patches there. JSON-ready."""
    plan = plan_inspect(path, base, lora_type, base_type)
    tensors = plan.lora.index.tensors
    peft_dir = plan.lora.config is not None
    modules, work = [], Workspace()
    for module in plan.modules:
        keys = [k for k in (module.up_key, module.down_key, module.diff_key, module.alpha_key) if k]
        norm = delta_norm(module, tensors, work)
        modules.append(
            {
                "module": module.module,
                "leaf": module.leaf,
                "kind": module.kind,
                "naming": module_naming(module, peft_dir),
                "shape": list(module.shape),
                "rank": module.rank,
                "alpha": module.alpha,
                "scale": module.scale,
                "dtypes": sorted({tensors[k].dtype for k in keys}),
                "bytes": sum(tensors[k].nbytes for k in keys),
                "norm": norm if math.isfinite(norm) else None,
            }
        )
    by_naming = namings(plan)
    lowrank = [m for m in plan.modules if m.kind == "lowrank"]
    return {
        "path": plan.path,
        "file": plan.lora.file,
        "format": plan.lora.index.format,
        "adapter_config": plan.lora.config,
        "naming": _detected(by_naming),
        "namings": dict(sorted(by_naming.items())),
        "tensors": len(tensors),
        "bytes": sum(info.nbytes for info in tensors.values()),
        "dtypes": dict(sorted(Counter(info.dtype for info in tensors.values()).items())),
        "lowrank": len(lowrank),
        "diffs": len(plan.modules) - len(lowrank),
        "ranks": _histogram(m.rank for m in lowrank),
        "alphas": _histogram("none" if m.alpha is None else m.alpha for m in lowrank),
        "scales": _histogram(m.scale for m in lowrank),
        "nonfinite": [m["module"] for m in modules if m["norm"] is None],
        "unmatched": {u.lora_key: u.reason for u in plan.unmatched},
        "warnings": list(plan.lora.warnings),
        "modules": modules,
        "base": _base(plan),
        "clients": _clients(plan),
    }


def _clients(plan: InspectPlan) -> dict | None:
    """Per client (``lora/clients``), whether it loads the file and which entries it applies;
    None for a LoRA of a model whose loaders' rules are not known (not Wan)."""
    keys = tuple(plan.lora.index.tensors)
    if not judges(keys):
        return None
    file = LoraFile(keys, tuple(plan.modules), peft_config=plan.lora.config is not None)
    return {
        name: {**loading.to_dict(), "summary": loading.summary()}
        for name, loading in client_loadings(file).items()
    }


def _detected(by_naming: Counter) -> str:
    if len(by_naming) == 1:
        return next(iter(by_naming))
    return "mixed" if by_naming else "none"


def _histogram(values) -> dict[str, int]:
    """Value → count, keys as text (JSON), numbers in ascending order."""
    counts = Counter(values)
    ordered = sorted(counts, key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0))
    return {_text(v): counts[v] for v in ordered}


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _base(plan: InspectPlan) -> dict | None:
    """Base keys patched; keys of the LoRA's modules that patch nothing (why), shape mismatches
    apart (keys in no module are listed once, under ``unmatched``)."""
    if plan.mapping is None:
        return None
    no_module = {u.lora_key for u in plan.unmatched}
    left = [u for u in plan.mapping.unmatched if u.lora_key not in no_module]
    return {
        "path": plan.base.path,
        "tensors": len(plan.base.tensors),
        "targeted": [patch.base_key for patch in plan.mapping.patches],
        "untargeted": {
            u.lora_key: u.reason for u in left if not u.reason.startswith("shape mismatch")
        },
        "shape_mismatches": {
            u.lora_key: u.reason for u in left if u.reason.startswith("shape mismatch")
        },
    }
