"""Rank modes on extract: deltas with known spectra, chosen ranks equal to each mode's formula
(written out here independently of kernels/ranks.py), mode and cap changes re-exported from the
work directory with nothing recomputed, and one file per rank of ``--rank 4,8``."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.kernels import RankRule
from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.extract.command import extract
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.extract.plan import ExtractTask
from loraforge.pipeline.extract.resume import extract_fingerprint
from loraforge.pipeline.io.reader import TensorInfo
from loraforge.pipeline.run.options import RunOptions

# Equal out + in (70), so budget mode's greedy is exactly the least total squared error.
SHAPES = {"a.weight": (40, 30), "b.weight": (50, 20)}
CAP = 8


def spectrum(key: str) -> list[float]:
    n = min(SHAPES[key])
    if key == "a.weight":
        return [8.0 * 0.5**i for i in range(n)]  # fast decay
    return [3.0 * 0.8**i for i in range(n)]  # slow decay


def known_delta(key: str, seed: int) -> torch.Tensor:
    """U·diag(s)·Vᵀ in fp64 with orthonormal U, V: the delta's singular values are s."""
    g = torch.Generator().manual_seed(seed)
    out, inp = SHAPES[key]
    s = torch.tensor(spectrum(key), dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, len(s), generator=g, dtype=torch.float64)).Q
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spectra")
    base = {key: torch.zeros(shape) for key, shape in SHAPES.items()}
    target = {key: known_delta(key, i).float() for i, key in enumerate(SHAPES)}
    paths = str(directory / "base.safetensors"), str(directory / "target.safetensors")
    save_file(base, paths[0])
    save_file(target, paths[1])
    return paths


def run(pair, tmp_path, rule: RankRule | None = None, ranks=(), name="lora.safetensors"):
    options = ExtractOptions(
        kernel=KernelOptions(
            method="full", rank=max(ranks) if ranks else rule.rank if rule else CAP
        ),
        rank_rule=rule,
        ranks=ranks,
        lowrank_min_params=100,
        output_dtype="fp32",
    )
    return extract(
        source_model=pair[0],
        target_model=pair[1],
        output=str(tmp_path / name),
        options=options,
        run=RunOptions(workers=1, work_dir=str(tmp_path / "work")),
    )


def expected(mode: str, value, key: str, min_rank: int = 1) -> int:
    s = spectrum(key)
    total = sum(v * v for v in s)
    if mode == "fixed":
        k = CAP
    elif mode == "energy":
        k = next(i for i in range(1, len(s) + 1) if sum(v * v for v in s[:i]) >= value * total)
    elif mode == "ratio":
        k = sum(1 for v in s[:CAP] if s[0] / v <= value)
    else:  # threshold
        k = sum(1 for v in s[:CAP] if v >= value)
    return max(min(k, CAP), min_rank)


def best_budget(budget: int) -> dict[str, int]:
    """Brute force: the ranks (each ≤ CAP, ≥ 1) within ``budget`` parameters that drop the
    least squared error."""
    best = None
    for ka in range(1, CAP + 1):
        for kb in range(1, CAP + 1):
            if (ka + kb) * 70 > budget:
                continue
            dropped = sum(v * v for v in spectrum("a.weight")[ka:]) + sum(
                v * v for v in spectrum("b.weight")[kb:]
            )
            if best is None or dropped < best[0]:
                best = (dropped, {"a.weight": ka, "b.weight": kb})
    return best[1]


CASES = [
    ("fixed", None, {}),
    ("energy", 0.9, {"energy": 0.9}),
    ("energy", 0.999, {"energy": 0.999}),
    ("ratio", 10.0, {"sv_ratio": 10.0}),
    ("threshold", 0.7, {"sv_threshold": 0.7}),
]


def test_every_mode_chooses_the_formula_rank_and_reexports_without_computing(pair, tmp_path):
    first = run(pair, tmp_path)
    assert first["summary"]["computed"] == 2
    for mode, value, fields in CASES:
        for min_rank in (1, 3):
            rule = RankRule(mode=mode, rank=CAP, min_rank=min_rank, **fields)
            report = run(pair, tmp_path, rule)
            assert report["summary"]["computed"] == 0, (mode, value)
            assert report["options"]["rank_rule"]["mode"] == mode
            lora = load_file(tmp_path / "lora.safetensors")
            for key in SHAPES:
                want = expected(mode, value, key, min_rank)
                entry = report["tensors"][key]
                assert (entry["rank"], entry["status"]) == (want, "reused"), (mode, value, key)
                stem = "diffusion_model." + key.removesuffix(".weight")
                assert lora[f"{stem}.lora_up.weight"].shape == (SHAPES[key][0], want)
                assert lora[f"{stem}.lora_down.weight"].shape[0] == want
                assert f"{stem}.alpha" not in lora  # alpha = rank: scale 1 without a key
                s = spectrum(key)
                kept = sum(v * v for v in s[:want]) / sum(v * v for v in s)
                assert entry["kept_energy"] == pytest.approx(kept, abs=1e-6)
                assert entry["kernel_rel_error"] == pytest.approx(math.sqrt(1 - kept), abs=1e-5)


@pytest.mark.parametrize("budget", [140, 700, 1000, 1120])
def test_budget_mode_spends_the_budget_where_it_removes_the_most_error(pair, tmp_path, budget):
    run(pair, tmp_path)
    report = run(pair, tmp_path, RankRule(mode="budget", rank=CAP, rank_budget=budget))
    chosen = {key: report["tensors"][key]["rank"] for key in SHAPES}
    assert chosen == best_budget(budget)
    assert report["summary"]["outputs"][0]["lowrank_params"] == 70 * sum(chosen.values())
    assert report["summary"]["computed"] == 0


def test_budget_below_the_floors_is_a_usage_error(pair, tmp_path):
    with pytest.raises(UsageError, match="--rank-budget 100 is below the --min-rank 1 floors"):
        run(pair, tmp_path, RankRule(mode="budget", rank=CAP, rank_budget=100))
    assert not (tmp_path / "lora.safetensors").exists()


def test_several_ranks_write_one_file_each_from_one_factorisation(pair, tmp_path):
    report = run(pair, tmp_path, ranks=(4, CAP))
    assert report["summary"]["computed"] == 2
    assert [o["rank"] for o in report["summary"]["outputs"]] == [4, CAP]
    assert report["summary"]["files"] == [
        str(tmp_path / "lora-r4.safetensors"),
        str(tmp_path / "lora-r8.safetensors"),
    ]
    assert not (tmp_path / "lora.safetensors").exists()
    small = load_file(tmp_path / "lora-r4.safetensors")
    assert small["diffusion_model.a.lora_up.weight"].shape == (40, 4)
    entry = report["tensors"]["a.weight"]
    assert entry["rank"] == CAP and entry["ranks"]["4"]["rank"] == 4
    # The rank-4 file is what a rank-4 export of the same work directory writes, byte for byte.
    alone = run(pair, tmp_path, RankRule(rank=4), ranks=(4,), name="alone.safetensors")
    assert alone["summary"]["computed"] == 0
    assert (tmp_path / "alone.safetensors").read_bytes() == (
        tmp_path / "lora-r4.safetensors"
    ).read_bytes()


def test_rank_list_and_rule_are_checked():
    with pytest.raises(UsageError, match=r"ranks \[8, 4\] must ascend to the kernel rank"):
        ExtractOptions(kernel=KernelOptions(rank=8), ranks=(8, 4))
    with pytest.raises(UsageError, match="--min-rank 6 is above --rank 4"):
        ExtractOptions(
            kernel=KernelOptions(rank=8), rank_rule=RankRule(rank=8, min_rank=6), ranks=(4, 8)
        )
    options = ExtractOptions(kernel=KernelOptions(rank=8))
    assert options.rank_rule == RankRule(rank=8) and options.ranks == (8,)
    assert ExtractOptions.from_dict(options.to_dict()) == options


def test_the_stopping_rule_counts_for_resume_only_when_iterations_are_adaptive():
    info = TensorInfo("a.weight", "/m.safetensors", "F32", (40, 30), 8)
    task = ExtractTask("a.weight", "lowrank", (40, 30), 8, info, info, {})

    def fingerprint(**kernel):
        return extract_fingerprint(task, KernelOptions(**kernel), "cpu")["kernel"]

    assert fingerprint(n_iter=None, tol=0.01) != fingerprint(n_iter=None, tol=0.02)
    assert fingerprint(n_iter=None, max_iter=3) != fingerprint(n_iter=None, max_iter=4)
    assert fingerprint(n_iter=2, tol=0.01) == fingerprint(n_iter=2, tol=0.02)
    assert fingerprint(n_iter=2, sketch="fp32") == {
        "method": "randomized",
        "oversample": 16,
        "n_iter": 2,
        "sketch": "fp32",
    }


def test_a_recomputed_intermediate_below_its_stored_rank_reports_its_own_error(pair, tmp_path):
    """Stored at rank 8, exported at 4 after an unreadable chunk: the recompute factors at 4,
    so the error comes from its new marker and singular values, not the stored rank-8 ones
    (whose components 4..8 its residual already holds)."""
    run(pair, tmp_path)
    folder = tmp_path / "work" / "tensors" / "a.weight" / "up"
    chunk = next(folder.glob("c.*"))
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    report = run(pair, tmp_path, RankRule(rank=4), ranks=(4,))
    entry = report["tensors"]["a.weight"]
    assert entry["status"] == "recomputed" and entry["rank"] == 4
    s = spectrum("a.weight")
    kept = sum(v * v for v in s[:4]) / sum(v * v for v in s)
    assert entry["kept_energy"] == pytest.approx(kept, abs=1e-6)
    assert entry["kernel_rel_error"] == pytest.approx(math.sqrt(1 - kept), rel=1e-4)
