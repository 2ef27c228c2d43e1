"""Every number that scales a LoRA: a real, finite number within float32's range."""

import math

import numpy as np
import pytest

from loraforge.pipeline.errors import CheckpointFormatError, UsageError
from loraforge.pipeline.lora.numbers import checked

RANGE = "float32's range (±3.4e+38), in which LoRAs are applied"


@pytest.mark.parametrize(
    "value, message",
    [
        (math.nan, "s must be finite, got nan"),
        (-math.inf, "s must be finite, got -inf"),
        (3.5e38, f"s 3.5e+38 is outside {RANGE}"),
        (10**400, f"s {10**400} is outside {RANGE}"),
        (True, "s must be a number, got True"),
        ("0.5", "s must be a number, got '0.5'"),
        (None, "s must be a number, got None"),
    ],
)
def test_refused(value, message):
    with pytest.raises(UsageError) as info:
        checked(value, "s")
    assert str(info.value) == message


def test_accepted_and_the_error_type_is_the_callers():
    assert checked(np.float32(0.25), "s") == 0.25
    assert checked(-3.4e38, "s") == -3.4e38
    assert checked(7, "s") == 7.0
    with pytest.raises(CheckpointFormatError) as info:
        checked(math.nan, "'lora_alpha'", path="c.json", error=CheckpointFormatError, hint="h")
    assert str(info.value) == "c.json: 'lora_alpha' must be finite, got nan (h)"
