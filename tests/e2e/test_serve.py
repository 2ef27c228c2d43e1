"""``loraforge serve`` as a real process on a free port, driven over HTTP as a LightX2V client
would: requests A (LoRA 1), B (LoRA 2 at 0.5) and C (no LoRA) each give what a separate
``loraforge infer`` run with the same seed gives, bit for bit; after C the transformer holds the
base's bytes; bad requests get a 4xx naming the field and the server goes on; values of one
request never reach the next; a running task is cancelled at its next step."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

from tests.helpers.cli import CLI, run_cli  # noqa: E402
from tests.helpers.tiny_wan import PROMPT, read_mp4  # noqa: E402

pytestmark = pytest.mark.slow
SEED = 11


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, body: dict | None = None):
    """(status, parsed JSON or raw bytes)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw, kind = response.read(), response.headers.get("content-type", "")
            return response.status, json.loads(raw) if kind.startswith("application/json") else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(wan_sample, no_lora_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    lora_dir = root / "loras"
    lora_dir.mkdir()
    for name in ("style_a", "style_b"):
        os.symlink(wan_sample[name], lora_dir / f"{name}.safetensors")
    import torch
    from safetensors.torch import save_file

    save_file(  # a LoRA for another model: half its keys patch nothing here
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 32),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(32, 2),
            "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.ones(2, 32),
            "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.ones(32, 2),
        },
        str(lora_dir / "other_model.safetensors"),
    )
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--model_cls",
            "wan2.1",
            "--task",
            "t2v",
            "--model_path",
            wan_sample["model"],
            "--config_json",
            no_lora_config,
            "--lora_dir",
            str(lora_dir),
            "--output_dir",
            str(root / "out"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the server exited ({process.returncode}): {(root / 'server.log').read_text()}"
                )
            try:
                if http("GET", base + "/v1/service/status")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not come up in 180 s")
            time.sleep(0.2)
        yield {"url": base, "root": root, "process": process}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        log.close()


@pytest.fixture(scope="module")
def no_lora_config(wan_sample, tmp_path_factory):
    """The sample's config without its LoRA: what the server and the infer runs share."""
    path = tmp_path_factory.mktemp("config") / "no_lora.json"
    with open(wan_sample["lora_config"]) as f:
        data = json.load(f)
    del data["lora_configs"]
    data["self_attn_1_type"] = "flash_attn3"  # a LightX2V field loraforge does not use
    path.write_text(json.dumps(data))
    return str(path)


def wait(server, task_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = http("GET", f"{server['url']}/v1/tasks/{task_id}/status")[1]
        if status["status"] not in ("pending", "processing"):
            return status
        time.sleep(0.05)
    raise TimeoutError(task_id)


def infer_run(wan_sample, config, out, *lora_args):
    output = os.path.join(out, "out.mp4")
    result = run_cli(
        "infer",
        "--model_cls",
        "wan2.1",
        "--model_path",
        wan_sample["model"],
        "--config_json",
        config,
        "--prompt",
        PROMPT,
        "--seed",
        str(SEED),
        "--save_result_path",
        output,
        *lora_args,
    )
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "out.report.json")) as f:
        return json.load(f)["summary"], output


def test_each_request_equals_a_separate_infer_run_and_c_leaves_the_base(
    no_lora_config, server, wan_sample, tmp_path
):
    url = server["url"]
    requests = {
        "A": {"lora_name": "style_a.safetensors"},
        "B": {"lora_name": "style_b.safetensors", "lora_strength": 0.5},
        "C": {},
    }
    ids = {}
    for name, loras in requests.items():  # queued back to back: run in order
        body = {"prompt": PROMPT, "seed": SEED, "save_result_path": f"{name}.mp4", **loras}
        status, response = http("POST", url + "/v1/tasks/video/", body)
        assert status == 200 and response["task_status"] == "pending", response
        assert response["save_result_path"] == f"{name}.mp4"
        ids[name] = response["task_id"]
    finished = {name: wait(server, task_id) for name, task_id in ids.items()}
    lora_args = {
        "A": ("--lora_path", wan_sample["style_a"]),
        "B": ("--lora_path", wan_sample["style_b"], "--lora_strength", "0.5"),
        "C": (),
    }
    digests = set()
    for name, status in finished.items():
        assert status["status"] == "completed", status
        code, video = http("GET", f"{url}/v1/tasks/{ids[name]}/result")
        assert code == 200 and video[4:8] == b"ftyp"
        summary, mp4 = infer_run(wan_sample, no_lora_config, str(tmp_path / name), *lora_args[name])
        assert status["frames_sha256"] == summary["frames_sha256"], name
        with open(mp4, "rb") as f:
            assert f.read() == video, name  # same frames, same encoder: same bytes
        digests.add(status["frames_sha256"])
    assert len(digests) == 3
    assert read_mp4(str(server["root"] / "out" / "C.mp4")).shape == (5, 32, 32, 3)

    from loraforge.pipeline.runtime.generate import Runtime
    from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

    base = Runtime.load(open_spec(RuntimeOptions("wan2.1", "t2v", wan_sample["model"]), "cpu"))
    status = http("GET", url + "/v1/service/status?weights_digest=1")[1]
    assert status["weights_digest"] == base.digest()
    assert (status["current_loras"], status["held_bytes"]) == ([], 0)
    assert (status["completed_tasks"], status["failed_tasks"]) == (3, 0)


@pytest.mark.parametrize(
    ("body", "code", "field", "detail"),
    [
        (
            {"lora_name": "nope.safetensors"},
            404,
            "lora_name",
            "no LoRA 'nope.safetensors' in --lora_dir",
        ),
        (
            {"lora_name": "../loras/../../x.safetensors"},
            403,
            "lora_name",
            "'../loras/../../x.safetensors' reaches outside --lora_dir",
        ),
        (
            {"lora_name": "style_a.safetensors", "lora_strength": float("inf")},
            422,
            "lora_strength",
            "lora_strength: Input should be a finite number",
        ),
        (
            {"lora_configs": [{"path": "style_a.safetensors", "strength": float("nan")}]},
            422,
            "lora_configs.0.strength",
            "lora_configs.0.strength: Input should be a finite number",
        ),
        ({"seed": -1}, 422, "seed", "seed: Input should be greater than or equal to 0"),
        (
            {"lora_name": "other_model.safetensors"},
            400,
            "lora_name",
            "{lora_dir}/other_model.safetensors: 2 of its 4 keys patch nothing in transformer "
            "(e.g. 'diffusion_model.blocks.7.self_attn.q.lora_down.weight': targets no base "
            "tensor) (is it a LoRA for this model?)",
        ),
    ],
)
def test_a_bad_request_is_a_4xx_naming_the_field(server, body, code, field, detail):
    status, response = http("POST", server["url"] + "/v1/tasks/video/", body)
    lora_dir = str(server["root"] / "loras")
    assert (status, response) == (
        code,
        {"detail": detail.format(lora_dir=lora_dir), "field": field},
    )


def test_the_server_goes_on_and_no_value_leaks_into_the_next_request(server):
    url = server["url"]
    assert http("POST", url + "/v1/tasks/video", {})[0] == 405  # LightX2V's trailing slash
    first = http("POST", url + "/v1/tasks/video/", {"target_video_length": 9, "seed": 1})[1]
    second = http("POST", url + "/v1/tasks/video/", {"seed": 1})[1]
    for response, frames in ((first, 9), (second, 5)):
        status = wait(server, response["task_id"])
        assert status["status"] == "completed"
        assert read_mp4(str(server["root"] / "out" / status["save_result_path"])).shape[0] == frames
    listed = http("GET", url + "/v1/tasks/")[1]
    assert first["task_id"] in listed and second["task_id"] in listed
    assert http("POST", url + "/v1/tasks/video/", {"task_id": first["task_id"]}) == (
        409,
        {
            "detail": f"Task ID {first['task_id']} already exists: give another task_id",
            "field": "task_id",
        },
    )
    assert http("GET", url + "/v1/tasks/nope/status") == (404, {"detail": "Task not found"})


def test_cancel_a_running_task_and_a_pending_one(server):
    url = server["url"]
    running = http("POST", url + "/v1/tasks/video/", {"infer_steps": 400, "seed": 2})[1]
    pending = http("POST", url + "/v1/tasks/video/", {"seed": 3})[1]
    deadline = time.monotonic() + 60
    while http("GET", f"{url}/v1/tasks/{running['task_id']}/status")[1]["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queue = http("GET", url + "/v1/tasks/queue/status")[1]
    assert (queue["is_processing"], queue["current_task"], queue["pending_count"]) == (
        True,
        running["task_id"],
        1,
    )
    for task in (pending, running):
        assert http("DELETE", f"{url}/v1/tasks/{task['task_id']}")[1] == {
            "stop_status": "success",
            "reason": "Task stopped successfully.",
        }
    deadline = time.monotonic() + 60
    while http("GET", url + "/v1/service/status")[1]["service_status"] == "busy":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status = http("GET", f"{url}/v1/tasks/{running['task_id']}/status")[1]
    assert status["status"] == "cancelled" and status["progress"]["step"] < 400
    assert http("GET", f"{url}/v1/tasks/{running['task_id']}/result") == (
        404,
        {"detail": "Task not completed"},
    )
    assert not os.path.exists(server["root"] / "out" / running["save_result_path"])
    assert http("GET", f"{url}/v1/tasks/{pending['task_id']}/status")[1]["status"] == "cancelled"
    assert http("DELETE", f"{url}/v1/tasks/{running['task_id']}")[1]["stop_status"] == "do_nothing"


def test_sigterm_stops_the_server_cleanly(server):
    process = server["process"]
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0
    log = (server["root"] / "server.log").read_text()
    assert [line for line in log.splitlines() if line.startswith("note: ")] == [
        "note: config fields not used by --model_cls wan2.1: self_attn_1_type",
        f"note: serving wan2.1 t2v on {server['url']}",
        "note: server stopped",
    ]
    assert log.endswith("note: server stopped\n")
