"""scripts/wan/: each script's command is what ``loraforge infer`` takes. The script runs with a
recording ``loraforge`` first on PATH; the recorded arguments then run for real on the tiny
sample, with its config and output in place of the 14B model's."""

import os
import stat
import subprocess

import pytest

from tests.helpers.cli import run_cli
from tests.helpers.tiny_wan import ROOT

pytest.importorskip("diffusers")

SCRIPTS = {
    "run_wan_t2v_distill_lora_4step_cfg.sh": ("model", "distill_config"),
    "run_wan_i2v_distill_lora_4step_cfg.sh": ("model_i2v", "distill_config"),
    "run_wan22_moe_t2v_distill_lora_4step.sh": ("model_moe", "moe_config"),
}


def recorded(script: str, tmp_path, env: dict) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "loraforge"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {tmp_path}/args\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "wan", script)],
        env={**os.environ, **env, "PATH": path},
        check=True,
        timeout=60,
    )
    return (tmp_path / "args").read_text().split("\0")[:-1]


def test_every_script_is_listed():
    found = {n for n in os.listdir(os.path.join(ROOT, "scripts", "wan")) if n.endswith(".sh")}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_scripts_command_runs(script, wan_sample, tmp_path):
    model, config = SCRIPTS[script]
    env = {"model_path": wan_sample[model], "image_path": wan_sample["image"]}
    args = recorded(script, tmp_path, env)
    assert args[0] == "infer"
    values = dict(zip(args[1::2], args[2::2], strict=False))
    assert values["--model_path"] == wan_sample[model]
    assert values["--config_json"].startswith(os.path.join(ROOT, "configs", "infer_"))
    assert os.path.exists(values["--config_json"])
    out = str(tmp_path / "out.mp4")
    args += ["--config_json", wan_sample[config], "--save_result_path", out, "--dtype", "fp32"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert os.path.exists(out)
