"""TrainConfig refuses impossible settings at the boundary, naming the field."""
from __future__ import annotations

import pytest

from search_spaces.errors import ConfigError
from trainer.config import TrainConfig


@pytest.mark.parametrize(("field", "value"), [("ema_tau", 0.0), ("workers", -1), ("grad_clip", -1.0),
                                              ("min_warmup_iters", -5), ("val_interval", 0), ("imgsz", 100)])
def test_impossible_settings_name_their_field(field, value):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert e.value.field == field

