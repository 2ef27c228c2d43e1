"""The CLI of rank modes (extract), resize and verify on the tiny pair: re-exports with nothing
recomputed, one file per rank, resize of two LoRAs, verify's exit codes and one-line errors."""

import json
import os

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import MIN_PARAMS, pair_tensors
from tests.helpers.cli import run_cli
from tests.helpers.reference import read_report


def extract(tmp_path, pair_files, *extra, output="lora.safetensors"):
    result = run_cli(
        "extract",
        "--source-model",
        pair_files[0],
        "--target-model",
        pair_files[1],
        "--output",
        tmp_path / output,
        "--work-dir",
        tmp_path / "work",
        "--lowrank-min-params",
        MIN_PARAMS,
        "--svd",
        "full",
        "--quiet",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return read_report(tmp_path / "lora.report.json")


def one_line(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr == f"error: {message}\n"


def test_rank_modes_reexport_without_computing(tmp_path, pair_files):
    first = extract(tmp_path, pair_files, "--rank", "8")
    assert first["summary"]["computed"] == 8
    for extra in (
        ("--rank-mode", "energy", "--energy", "0.999"),
        ("--rank-mode", "ratio", "--sv-ratio", "20", "--min-rank", "2"),
        ("--rank-mode", "threshold", "--sv-threshold", "1e9", "--min-rank", "2"),
        ("--rank-mode", "budget", "--rank-budget", "3000"),
        ("--rank", "4"),
    ):
        report = extract(tmp_path, pair_files, "--rank", "8", *extra)
        assert report["summary"]["computed"] == 0, extra
        ranks = [
            report["tensors"][k]["rank"]
            for k in ("blocks.0.attn.q.weight", "blocks.0.ffn.0.weight")
        ]
        if "threshold" in extra:
            assert ranks == [2, 2]  # nothing reaches 1e9: the floor
        if "budget" in extra:  # a 7th rank (96 + 128 or 160 + 96 more) would pass 3000
            assert ranks == [6, 6]
            assert report["summary"]["outputs"][0]["lowrank_params"] == 6 * (224 + 256)
        if "energy" in extra or "ratio" in extra:  # rank 6 plus a 1e-4 tail
            assert ranks == [6, 6]
        if extra == ("--rank", "4"):  # the last --rank wins: a cap below the stored 8
            assert ranks == [4, 4]
    assert extract(tmp_path, pair_files, "--rank", "4,8")["summary"]["files"] == [
        str(tmp_path / "lora-r4.safetensors"),
        str(tmp_path / "lora-r8.safetensors"),
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (("--rank-mode", "energy"), "--rank-mode energy needs --energy"),
        (("--energy", "0.9"), "--energy applies only to --rank-mode energy"),
        (("--rank-mode", "energy", "--energy", "2"), "--energy must be in (0, 1], got 2.0"),
        (("--rank", "4,x"), "--rank '4,x' is not an integer or a comma-separated list of integers"),
        (("--rank", "8,0"), "--rank must be >= 1, got 0"),
        (("--power-iterations", "many"), "--power-iterations 'many' is not 'auto' or an integer"),
        (("--min-rank", "9", "--rank", "8"), "--min-rank must be in [1, --rank 8], got 9"),
    ],
)
def test_rank_usage_errors_exit_2(tmp_path, pair_files, args, message):
    result = run_cli(
        "extract",
        "--source-model",
        pair_files[0],
        "--target-model",
        pair_files[1],
        "--output",
        tmp_path / "lora.safetensors",
        *args,
    )
    one_line(result, 2, message)
    assert os.listdir(tmp_path) == []


def test_resize_then_verify(tmp_path, pair_files):
    extract(tmp_path, pair_files, "--rank", "4,8", "--output-dtype", "fp32")
    r4, r8 = tmp_path / "lora-r4.safetensors", tmp_path / "lora-r8.safetensors"
    resized = tmp_path / "sum.safetensors"
    result = run_cli(
        "resize",
        "--lora-model",
        r8,
        "--strength",
        "0.5",
        "--lora-model",
        r4,
        "--strength",
        "0.5",
        "--output",
        resized,
        "--rank",
        "8",
        "--output-dtype",
        "fp32",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "sum.report.json")
    assert report["command"] == "resize" and report["summary"]["computed"] == 7
    entry = report["tensors"]["blocks.0.ffn.0.weight"]
    assert (entry["full_rank"], entry["rank"]) == (12, 8)

    def verify(lora, *extra):
        return run_cli(
            "verify",
            "--source-model",
            pair_files[0],
            "--target-model",
            pair_files[1],
            "--lora-model",
            lora,
            *extra,
        )

    ok = verify(r8, "--max-error", "0.01", "--quiet")
    assert (ok.exit_code, ok.output) == (0, "")
    bad = verify(r4, "--max-error", "0.01", "--report", tmp_path / "v.json", "--json")
    assert bad.exit_code == 1
    verdict = read_report(tmp_path / "v.json")["summary"]
    message = (
        f"total relative error {verdict['rel_error']:.6g} is above --max-error 0.01; "
        f"worst {verdict['worst'][0]['key']}"
    )
    assert bad.stderr == f"error: {message}\n"
    events = [json.loads(line) for line in bad.stdout.splitlines()]
    assert events[-2]["event"] == "summary" and events[-2]["passed"] is False
    assert events[-1] == {**events[-1], "event": "error", "message": message, "exit_code": 1}


def test_resize_and_verify_never_write_over_an_input(tmp_path, pair_files):
    extract(tmp_path, pair_files, "--rank", "4")
    lora = tmp_path / "lora.safetensors"
    before = lora.read_bytes()
    resized = run_cli("resize", "--lora-model", lora, "--output", lora, "--rank", "2")
    one_line(
        resized,
        2,
        f"{lora}: --output would overwrite the input --lora-model {lora} (choose another --output)",
    )
    checked = run_cli(
        "verify",
        "--source-model",
        pair_files[0],
        "--target-model",
        pair_files[1],
        "--lora-model",
        lora,
        "--report",
        lora,
    )
    one_line(
        checked,
        2,
        f"{lora}: --report would overwrite the input --lora-model {lora} (choose another --report)",
    )
    assert lora.read_bytes() == before


def test_resize_writes_one_file_per_rank_in_the_key_style_asked(tmp_path, pair_files):
    extract(tmp_path, pair_files, "--rank", "8")
    result = run_cli(
        "resize",
        "--lora-model",
        tmp_path / "lora.safetensors",
        "--output",
        tmp_path / "k.safetensors",
        "--rank",
        "4,2",
        "--key-style",
        "kohya",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = read_report(tmp_path / "k.report.json")
    assert report["summary"]["files"] == [
        str(tmp_path / "k-r2.safetensors"),
        str(tmp_path / "k-r4.safetensors"),
    ]
    for cap in (2, 4):
        lora = load_file(tmp_path / f"k-r{cap}.safetensors")
        assert lora["lora_unet_blocks_0_ffn_0.lora_up.weight"].shape == (160, cap)
        assert float(lora["lora_unet_blocks_0_ffn_0.alpha"]) == cap
        assert report["tensors"]["blocks.0.ffn.0.weight"]["ranks"][str(cap)]["rank"] == cap


def test_temporaries_of_a_rank_list_are_cleaned_or_replaced(tmp_path, monkeypatch):
    """A run of --rank 4,8 killed while writing leaves a temporary per rank: ``clean`` finds
    them all, and a rerun with another rank list removes the ones it will not finish. (The
    kill is an interrupt whose clean-up is switched off: what SIGKILL leaves.)"""
    from loraforge.pipeline.export import write as export_write
    from loraforge.pipeline.run.session import Session
    from loraforge.pipeline.workdir.clean import clean_work_dir

    base, target = pair_tensors()
    save_file(base, tmp_path / "b.safetensors")
    save_file(target, tmp_path / "t.safetensors")
    args = ["extract", "--source-model", tmp_path / "b.safetensors"]
    args += ["--target-model", tmp_path / "t.safetensors", "--output", tmp_path / "y.safetensors"]
    args += ["--lowrank-min-params", "1000", "--quiet"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(export_write, "_write", interrupted)  # the outputs are open
        patch.setattr(Session, "fail", lambda *args, **kwargs: None)
        assert run_cli(*args, "--rank", "4,8").exit_code == 130
    partial = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))
    assert partial == [".y-r4.safetensors.partial", ".y-r8.safetensors.partial"]

    result = run_cli(*args, "--rank", "8")
    assert result.exit_code == 0, result.output
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert "removed the previous run's " in result.stderr + result.stdout

    with monkeypatch.context() as patch:
        patch.setattr(export_write, "_write", interrupted)  # the outputs are open
        patch.setattr(Session, "fail", lambda *args, **kwargs: None)
        assert run_cli(*args, "--rank", "2,4").exit_code == 130
    cleaned = clean_work_dir(str(tmp_path / "y.safetensors.work"))
    assert [os.path.basename(f) for f in cleaned.temporaries] == [
        ".y-r2.safetensors.partial",
        ".y-r4.safetensors.partial",
    ]


def test_a_budget_below_the_floors_is_said_before_any_svd(tmp_path, pair_files):
    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1]]
    args += ["--output", tmp_path / "lora.safetensors", "--lowrank-min-params", MIN_PARAMS]
    result = run_cli(*args, "--rank-mode", "budget", "--rank-budget", "100", "--quiet")
    floors = 96 + 128 + 160 + 96  # the two planned low-rank tensors at rank 1: out + in each
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"warning: --rank-budget 100 is below the --min-rank 1 floors of the 2 tensors planned "
        f"low rank ({floors} parameters): the export will refuse it unless enough of them turn "
        "out unchanged; the factors are kept for a rerun\n"
        f"error: --rank-budget 100 is below the --min-rank 1 floors of 2 tensors; the smallest "
        f"possible budget is {floors}\n"
    )
