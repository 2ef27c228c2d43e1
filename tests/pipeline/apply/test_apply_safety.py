"""The Python API is all or nothing: ``apply()`` and every handle method either succeed or
leave every byte of the model as it was; tied weights are restored; the checkpoint originals
are re-read from is checked first; a weight is patched by one live handle at a time; misuse
raises loraforge's own typed error with one line."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import loraforge
from loraforge.pipeline import errors
from loraforge.pipeline.apply import originals
from loraforge.pipeline.io.fingerprint import stored_crc32c
from loraforge.stages.merge import Delta, merge_weight

OUT, IN = 24, 16


def model(dtype=torch.float16, layers=3) -> torch.nn.Sequential:
    torch.manual_seed(0)
    m = torch.nn.Sequential(*(torch.nn.Linear(IN, OUT if i == 0 else IN) for i in range(layers)))
    m[1] = torch.nn.Linear(OUT, IN)  # 0: 24x16, 1: 16x24, 2: 24x16 wide enough to share
    m[2] = torch.nn.Linear(IN, OUT)
    return m.to(dtype).requires_grad_(False)


def factors(out, inp, rank=2, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) * scale, torch.randn(rank, inp, generator=g) * scale


def lora_file(path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    tensors = {}
    for name, (up, down) in modules.items():
        tensors[f"diffusion_model.{name}.lora_up.weight"] = up.contiguous()
        tensors[f"diffusion_model.{name}.lora_down.weight"] = down.contiguous()
    save_file(tensors, path)
    return str(path)


def snapshot(m) -> dict[str, bytes]:
    """Every byte of every tensor of ``m`` (a module or a state dict)."""
    state = m.state_dict() if isinstance(m, torch.nn.Module) else m
    return {
        k: bytes(v.detach().cpu().contiguous().view(torch.uint8).numpy()) for k, v in state.items()
    }


@pytest.fixture
def loras(tmp_path):
    """``good`` patches layers 0 and 2; ``bad`` patches 0 well and 2 with an Inf (in file
    order the second module); ``wide`` overflows fp16 on layer 2 only at strength 1e4."""
    up2, down2 = factors(OUT, IN, seed=3)
    bad_up = up2.clone()
    bad_up[5, 1] = math.inf
    big_up, big_down = torch.full((OUT, 1), 10.0), torch.full((1, IN), 10.0)
    return {
        "good": lora_file(
            tmp_path / "good.safetensors", {"0": factors(OUT, IN), "2": (up2, down2)}
        ),
        "bad": lora_file(
            tmp_path / "bad.safetensors", {"0": factors(OUT, IN), "2": (bad_up, down2)}
        ),
        "wide": lora_file(
            tmp_path / "wide.safetensors", {"0": factors(OUT, IN), "2": (big_up, big_down)}
        ),
        "one": lora_file(tmp_path / "one.safetensors", {"1": factors(IN, OUT, seed=5)}),
    }


# ---- failure in the middle -------------------------------------------------------------------


def test_a_failed_apply_leaves_every_byte_and_no_handle(loras):
    m = model()
    before = snapshot(m)
    with pytest.raises(errors.NonFiniteTensor) as info:
        loraforge.apply(m, [(loras["bad"], 1.0)])
    assert str(info.value).startswith(f"{loras['bad']}: tensor 'diffusion_model.2.lora_up.weight'")
    assert snapshot(m) == before
    # the weight it had written first (layer 0) took no part in a handle: a new apply works
    handle = loraforge.apply(m, [(loras["good"], 1.0)])
    handle.remove()
    assert snapshot(m) == before


def test_an_overflow_in_the_second_module_leaves_every_byte(loras):
    m = model()
    before = snapshot(m)
    with pytest.raises(errors.NonFiniteOutput) as info:
        loraforge.apply(m, [(loras["wide"], 1e4)])
    assert str(info.value) == (
        "tensor '2.weight': would be written holding NaN or Inf as fp16 (largest finite value "
        f"±65504); made from the model's weight + {loras['wide']} at strength 10000 × scale 1 "
        "(lower the strength)"
    )
    assert snapshot(m) == before


@pytest.mark.parametrize("how", ["add", "set_strengths", "remove_lora"])
def test_a_failed_change_leaves_the_handle_and_every_byte(loras, how):
    m = model()
    original = snapshot(m)
    handle = loraforge.apply(m, [(loras["good"], 0.5), (loras["wide"], 1.0)])
    patched = snapshot(m)
    with pytest.raises(errors.LoraforgeError):
        if how == "add":
            handle.add(loras["bad"], 1.0)
        elif how == "set_strengths":
            handle.set_strengths([0.5, 1e4])
        else:  # the second's file now holds Inf in its second module: recomputing fails
            up2, down2 = factors(OUT, IN, seed=3)
            up2[0, 0] = math.inf
            lora_file(loras["wide"], {"0": factors(OUT, IN), "2": (up2, down2)})
            handle.remove_lora(0)
    assert snapshot(m) == patched
    assert (handle.loras, handle.strengths) == ([loras["good"], loras["wide"]], [0.5, 1.0])
    handle.remove()
    assert snapshot(m) == original and handle.held_bytes == 0


def test_nan_and_inf_strengths_are_refused_before_any_write(loras):
    m = model()
    before = snapshot(m)
    for bad in (math.nan, math.inf, -1e39):
        with pytest.raises(errors.UsageError) as info:
            loraforge.apply(m, [(loras["good"], bad)])
        assert str(info.value).startswith(f"strength of {loras['good']} ")
    handle = loraforge.apply(m, [(loras["good"], 1.0)])
    patched = snapshot(m)
    with pytest.raises(errors.UsageError) as info:
        handle.set_strengths([math.nan])
    assert str(info.value) == f"strength of {loras['good']} must be finite, got nan"
    assert snapshot(m) == patched and handle.strengths == [1.0]
    handle.remove()
    assert snapshot(m) == before


# ---- tied weights ------------------------------------------------------------------------------


def tied_model():
    m = model(torch.bfloat16)
    m[2].weight = m[0].weight  # one tensor under two names
    return m


def test_tied_weights_patched_under_both_names_get_both_once_and_come_back(loras):
    m = tied_model()
    w0 = m[0].weight.detach().clone()
    before = snapshot(m)
    handle = loraforge.apply(m, [(loras["good"], 0.7)])
    assert handle.touched == ["0.weight", "2.weight"]
    assert handle.held_bytes == w0.numel() * 2  # one copy for the one storage
    (up0, down0), (up2, down2) = factors(OUT, IN), factors(OUT, IN, seed=3)
    deltas = [Delta(0.7, up=up0, down=down0), Delta(0.7, up=up2, down=down2)]
    expected = merge_weight(w0, deltas).to(torch.bfloat16)
    assert torch.equal(m[0].weight, expected) and m[2].weight is m[0].weight
    handle.set_strengths([-0.3])
    handle.remove()
    assert snapshot(m) == before


def test_a_tied_weight_patched_by_name_then_by_its_other_name_comes_back(loras, tmp_path):
    """The second name's original is the first's: never copied after the first patch."""
    m = tied_model()
    before = snapshot(m)
    only2 = lora_file(tmp_path / "only2.safetensors", {"2": factors(OUT, IN, seed=9)})
    only0 = lora_file(tmp_path / "only0.safetensors", {"0": factors(OUT, IN, seed=8)})
    handle = loraforge.apply(m, [(only0, 1.0)])
    handle.add(only2, 2.0)
    handle.remove_lora(0)
    handle.remove()
    assert snapshot(m) == before and handle.held_bytes == 0


# ---- the checkpoint originals are re-read from -----------------------------------------------


@pytest.fixture
def loaded(tmp_path, loras):
    """A state dict loaded from ``base.safetensors`` and a handle re-reading from it."""
    m = model(torch.bfloat16)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    base = tmp_path / "base.safetensors"
    save_file(state, base)
    shutil.copy(base, tmp_path / "copy.safetensors")
    original = snapshot(state)
    handle = loraforge.apply(state, [(loras["good"], 1.0)], checkpoint=base)
    assert handle.held_bytes == 0
    return state, handle, base, original


def test_a_changed_checkpoint_is_refused_and_another_file_can_stand_in(loaded, tmp_path):
    state, handle, base, original = loaded
    patched = snapshot(state)
    save_file({k: v + 1 for k, v in state.items()}, base)  # same names and shapes, other bytes
    for change in (handle.remove, lambda: handle.set_strengths([0.5])):
        with pytest.raises(errors.OriginalsChanged) as info:
            change()
        assert str(info.value) == (
            f"{base}: tensor '0.weight': no longer holds the original bytes read at apply(): "
            "the file changed (the model is left as it is; handle.use_checkpoint(path) takes a "
            "file holding them)"
        )
        assert snapshot(state) == patched
    with pytest.raises(errors.OriginalsChanged):
        handle.use_checkpoint(base)  # it does not hold them either
    handle.use_checkpoint(tmp_path / "copy.safetensors")
    handle.remove()
    assert snapshot(state) == original


def test_a_deleted_checkpoint_is_a_file_not_found_error(loaded, tmp_path):
    state, handle, base, original = loaded
    patched = snapshot(state)
    os.remove(base)
    with pytest.raises(FileNotFoundError) as info:
        handle.remove()
    assert isinstance(info.value, errors.OriginalsGone)
    assert str(info.value).startswith(f"{base}: the checkpoint holding the originals is gone (")
    assert snapshot(state) == patched
    handle.use_checkpoint(tmp_path / "copy.safetensors")
    handle.remove()
    assert snapshot(state) == original


def test_a_touched_checkpoint_with_the_same_bytes_still_serves(loaded):
    state, handle, base, original = loaded
    os.utime(base, ns=(1, 1))  # stat changed, bytes not: re-hashed, accepted
    handle.remove()
    assert snapshot(state) == original


def test_a_touched_checkpoint_is_re_hashed_once(loaded, monkeypatch):
    state, handle, base, original = loaded
    os.utime(base, ns=(1, 1))
    hashed = []

    def counting(info):
        hashed.append(info.key)
        return stored_crc32c(info)

    monkeypatch.setattr(originals, "stored_crc32c", counting)
    handle.set_strengths([0.5])
    assert hashed == ["0.weight", "2.weight"]
    handle.set_strengths([0.25])  # the stat the bytes matched at is the one compared now
    handle.remove()
    assert hashed == ["0.weight", "2.weight"]
    assert snapshot(state) == original


# ---- one live handle per weight --------------------------------------------------------------


def test_a_second_handle_on_a_patched_weight_is_refused(loras):
    m = model()
    original = snapshot(m)
    first = loraforge.apply(m, [(loras["good"], 1.0)])
    patched = snapshot(m)
    with pytest.raises(errors.AlreadyPatched) as info:
        loraforge.apply(m, [(loras["good"], 1.0)])
    assert str(info.value) == (
        "tensor '0.weight': is patched by another live apply() handle, which alone can restore "
        "it (change that handle (set_strengths, add, remove_lora) or remove() it first)"
    )
    assert snapshot(m) == patched
    other = loraforge.apply(m, [(loras["one"], 1.0)])  # another weight: fine
    other.remove()
    first.remove()
    assert snapshot(m) == original
    loraforge.apply(m, [(loras["good"], 1.0)]).remove()  # free again
    assert snapshot(m) == original


# ---- misuse: loraforge's typed errors, one line ---------------------------------------------


def test_misuse_raises_typed_one_line_errors(loras, tmp_path):
    m = model()
    before = snapshot(m)
    handle = loraforge.apply(m, loras["good"])  # one path: one LoRA, not its characters
    assert handle.loras == [loras["good"]] and handle.strengths == [1.0]
    patched = snapshot(m)
    cases = [
        (lambda: handle.remove_lora(str(tmp_path / "x.safetensors")), errors.NotApplied, KeyError),
        (lambda: handle.remove_lora(3), errors.NotApplied, IndexError),
        (lambda: handle.remove_lora(1.5), errors.ArgumentTypeError, TypeError),
        (lambda: handle.set_strengths(0.5), errors.ArgumentTypeError, TypeError),
        (lambda: handle.set_strengths(["0.5"]), errors.ArgumentTypeError, TypeError),
        (lambda: handle.set_strengths([1, 2]), errors.UsageError, ValueError),
        (lambda: handle.add(loras["bad"]), errors.NonFiniteTensor, ValueError),
        (lambda: handle.add(tmp_path / "gone.safetensors"), errors.CheckpointNotFound, OSError),
        (lambda: loraforge.apply({"w": 1.0}, []), errors.ArgumentTypeError, TypeError),
        (lambda: loraforge.apply([m], []), errors.ArgumentTypeError, TypeError),
        (lambda: loraforge.apply(m, 7), errors.ArgumentTypeError, TypeError),
        (lambda: loraforge.apply(m, [(loras["one"], "1")]), errors.ArgumentTypeError, TypeError),
    ]
    for call, error, builtin in cases:
        with pytest.raises(error) as info:
            call()
        assert isinstance(info.value, builtin)
        assert "\n" not in str(info.value) and str(info.value)
        assert snapshot(m) == patched
    assert handle.loras == [loras["good"]]  # the LoRA add() refused is not in the list
    handle.remove()
    assert snapshot(m) == before


def test_a_lora_for_other_shapes_is_blamed_on_its_shapes(tmp_path):
    lora = lora_file(tmp_path / "other.safetensors", {"0": factors(OUT, 40)})
    m = model()
    before = snapshot(m)
    with pytest.raises(errors.LoraMismatch) as info:
        loraforge.apply(m, [lora])
    assert str(info.value) == (
        f"{lora}: none of its 2 keys patches the base, e.g. 'diffusion_model.0.lora_down.weight':"
        " shape mismatch: up@down is 24x40 but base is 24x16 (is this LoRA for another model?)"
    )
    assert snapshot(m) == before


@pytest.mark.gpu
def test_on_cuda_a_failure_in_the_middle_and_tied_weights_leave_every_byte(loras):
    m = tied_model().cuda()
    before = snapshot(m)
    with pytest.raises(errors.NonFiniteTensor):
        loraforge.apply(m, [(loras["bad"], 1.0)])
    assert snapshot(m) == before
    handle = loraforge.apply(m, [(loras["good"], 0.7)], originals="cpu")
    assert m[2].weight is m[0].weight and m[0].weight.device.type == "cuda"
    handle.set_strengths([-0.2])
    handle.remove()
    assert snapshot(m) == before
