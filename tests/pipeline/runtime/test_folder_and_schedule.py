"""A model folder checked before loading (task, transformers, multiples), and LightX2V's
step-distill schedule as diffusers' flow Euler scheduler runs it."""

import pytest

from loraforge.pipeline.errors import ModelMismatch
from loraforge.pipeline.runtime.folder import open_folder
from loraforge.pipeline.runtime.models import MODEL_CLASSES
from loraforge.pipeline.runtime.settings import Settings


def test_a_folder_opens_with_its_multiples(wan_sample):
    folder = open_folder(wan_sample["model_moe"], MODEL_CLASSES["wan2.2_moe"], "t2v")
    assert (folder.pipeline_class, folder.transformers) == (
        "WanPipeline",
        ("transformer", "transformer_2"),
    )
    assert (folder.spatial, folder.temporal, folder.boundary_ratio) == (16, 4, 0.875)


@pytest.mark.parametrize(
    ("folder", "model", "task", "message"),
    [
        (
            "model",
            "wan2.1",
            "i2v",
            "model_index.json names WanPipeline; --task i2v needs a "
            "WanImageToVideoPipeline folder (pick the --task the model was made for, or another "
            "--model_path)",
        ),
        (
            "model",
            "wan2.2_moe",
            "t2v",
            "the folder holds one transformer; --model_cls wan2.2_moe "
            "runs 2 (use --model_cls wan2.2_moe(_distill) for two, wan2.1(_distill) for one)",
        ),
        (
            "model_moe",
            "wan2.1",
            "t2v",
            "the folder holds two transformers (Wan 2.2 MoE); "
            "--model_cls wan2.1 runs 1 (use --model_cls wan2.2_moe(_distill) for two, "
            "wan2.1(_distill) for one)",
        ),
    ],
)
def test_folder_refusals(wan_sample, folder, model, task, message):
    with pytest.raises(ModelMismatch) as caught:
        open_folder(wan_sample[folder], MODEL_CLASSES[model], task)
    assert str(caught.value) == f"{wan_sample[folder]}: {message}"


def lightx2v_sigmas(steps, shift):
    """WanStepDistillScheduler.set_denoising_timesteps: σ = shift(x/1000), then 0."""
    return [shift * (x / 1000) / (1 + (shift - 1) * (x / 1000)) for x in steps] + [0.0]


@pytest.mark.parametrize("shift", [5.0, 3.0, 1.0])
def test_the_distill_schedule_is_lightx2vs(shift):
    from loraforge.pipeline.runtime.schedule import StepDistillScheduler

    steps = [1000, 750, 500, 250]
    scheduler = StepDistillScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.distill_sigmas = [x / 1000 for x in steps]
    scheduler.set_timesteps(50)  # what the pipeline asks for is ignored: the list decides
    expected = lightx2v_sigmas(steps, shift)
    assert [float(s) for s in scheduler.sigmas] == pytest.approx(expected, abs=1e-6)
    assert [float(t) for t in scheduler.timesteps] == pytest.approx(
        [1000 * s for s in expected[:-1]], abs=1e-3
    )


def test_moe_distill_hands_over_after_boundary_step_index():
    from types import SimpleNamespace

    from loraforge.pipeline.runtime.schedule import StepDistillScheduler, boundary

    scheduler = StepDistillScheduler(num_train_timesteps=1000, shift=5.0)
    scheduler.distill_sigmas = [1.0, 0.75, 0.5, 0.25]  # timesteps 1000, 937.5, 833.3, 625
    pipe = SimpleNamespace(scheduler=scheduler)
    settings = Settings(denoising_step_list=(1000, 750, 500, 250), boundary_step_index=2)
    ratio = boundary(pipe, MODEL_CLASSES["wan2.2_moe_distill"], settings, None)
    assert ratio == pytest.approx((937.5 + 2500 / 3) / 2 / 1000)
