"""``loraforge inspect``'s report as a person reads it: the LoRA's facts, its ranks, alphas and
scales, one row per module, and what it patches in a base."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table


def print_inspect(report: dict) -> None:
    """``loraforge inspect``'s report (``inspect.command.inspect_lora``) on stdout: the LoRA's
    facts, its ranks, alphas and scales, one row per module with its delta's norm, what is
    left over, and with ``--base`` what it patches there."""
    out = Console(highlight=False, emoji=False)
    longest = max((len(m["module"]) for m in report["modules"]), default=0)
    out.width = max(out.width, longest + 90)  # module names are never cut
    dtypes = ", ".join(f"{dtype} {n}" for dtype, n in report["dtypes"].items())
    out.print(f"{report['path']} ({report['format']}): {report['naming']} naming", markup=False)
    out.print(
        f"{report['tensors']} tensors ({dtypes}), {report['bytes'] / 1e9:.3f} GB; "
        f"{report['lowrank']} low-rank modules, {report['diffs']} diffs",
        markup=False,
    )
    if len(report["namings"]) > 1:
        mixed = ", ".join(f"{name} {n}" for name, n in report["namings"].items())
        out.print(f"namings: {mixed}", markup=False)
    pairs = Counter(
        (m["rank"], m["alpha"], m["scale"]) for m in report["modules"] if m["kind"] == "lowrank"
    )
    if pairs:
        table = Table(title="ranks, alphas and scales")
        for column in ("rank", "alpha", "scale", "modules"):
            table.add_column(column, justify="right")
        for (rank, alpha, scale), n in sorted(pairs.items(), key=lambda p: (p[0][0], p[0][2])):
            table.add_row(
                str(rank), "none" if alpha is None else f"{alpha:g}", f"{scale:g}", str(n)
            )
        out.print(table)
    table = Table(title="modules (norm: the delta's Frobenius norm, scale included)")
    for column in ("module", "kind", "shape", "rank", "scale", "dtype", "norm"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right")
    for m in report["modules"]:
        name = m["module"] if m["leaf"] == "weight" else f"{m['module']} ({m['leaf']})"
        norm = "NaN/Inf" if m["norm"] is None else f"{m['norm']:.6g}"
        rank = "" if m["rank"] is None else str(m["rank"])
        shape = "x".join(map(str, m["shape"]))
        table.add_row(name, m["kind"], shape, rank, f"{m['scale']:g}", ",".join(m["dtypes"]), norm)
    out.print(table)
    for key, reason in report["unmatched"].items():
        out.print(f"not read: {key}: {reason}", markup=False, soft_wrap=True)
    for warning in report["warnings"]:
        out.print(f"warning: {warning}", markup=False, soft_wrap=True)
    for client in (report["clients"] or {}).values():
        out.print(f"loads in {client['summary']}", markup=False, soft_wrap=True)
    base = report["base"]
    if base is None:
        return
    out.print(
        f"base {base['path']}: {len(base['targeted'])} of its {base['tensors']} tensors "
        f"targeted; {len(base['untargeted'])} LoRA keys target nothing, "
        f"{len(base['shape_mismatches'])} shape mismatches",
        markup=False,
        soft_wrap=True,
    )
    for key, reason in {**base["shape_mismatches"], **base["untargeted"]}.items():
        out.print(f"  {key}: {reason}", markup=False, soft_wrap=True)
