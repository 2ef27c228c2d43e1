"""benchmarks/measure.py's machine checks: free page reporting read from sysfs, and the priming
copy that leaves nothing behind."""

import importlib.util
import os

import pytest

# loaded from its path: benchmarks/ on sys.path would put merge.py, apply.py ... at top level
_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "measure.py")
_spec = importlib.util.spec_from_file_location("loraforge_benchmarks_measure", _PATH)
measure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(measure)


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    """A fake balloon device and reporting order; returns a function setting both."""
    device = tmp_path / "virtio0"
    device.mkdir()
    order = tmp_path / "page_reporting_order"
    monkeypatch.setattr(measure, "BALLOONS", str(tmp_path / "virtio*" / "features"))
    monkeypatch.setattr(measure, "REPORTING_ORDER", str(order))

    def write(features: str | None, reporting_order: str | None) -> None:
        if features is not None:
            (device / "features").write_text(features + "\n")
        if reporting_order is not None:
            order.write_text(reporting_order + "\n")

    return write


@pytest.mark.parametrize(
    ("features", "order", "expected"),
    [
        ("0110010000", "9", True),  # bit 5: VIRTIO_BALLOON_F_REPORTING
        ("0110000000", "9", False),  # a balloon without reporting
        ("0110010000", "11", False),  # reporting switched off: no order that high
        ("0110010000", "10", True),
        ("01100", "9", False),  # features too short to hold bit 5
        (None, "9", False),  # no balloon device
        ("0110010000", None, False),  # no page_reporting module
        ("0110010000", "x", False),
    ],
)
def test_free_page_reporting(sysfs, features, order, expected):
    sysfs(features, order)
    assert measure.free_page_reporting() is expected


def test_prime_copies_and_deletes_leaving_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"x" * 5000)
    scratch = tmp_path / "prime"
    measure.prime(str(folder), str(scratch))
    assert not scratch.exists()
    assert sorted(os.listdir(tmp_path)) == ["base"]
    assert (folder / "a.safetensors").read_bytes() == b"x" * 5000


def test_prime_refuses_an_existing_scratch_folder(tmp_path):
    folder, scratch = tmp_path / "base", tmp_path / "prime"
    folder.mkdir()
    scratch.mkdir()
    (scratch / "keep").write_text("user data")
    with pytest.raises(FileExistsError):
        measure.prime(str(folder), str(scratch))
    assert (scratch / "keep").read_text() == "user data"
