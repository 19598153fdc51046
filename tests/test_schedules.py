"""Temperature schedules: values at the boundaries and midpoint, applied to every part, validated in studies."""
import math

import pytest
import torch

from kdbench.config import parse_study
from kdbench.errors import KdbenchError
from kdbench.losses import create_loss
from kdbench.losses.combine import CombinedLoss
from kdbench.engine.schedules import temperature_at, temperature_modules
from kdbench.engine.teacher_outputs import TeacherProvider
from kdbench.engine.objectives import Batch, DistillObjective
from kdbench.study.checks import check_study


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_boundaries_and_midpoint(schedule):
    assert temperature_at(0, 10, schedule, 2, 8) == pytest.approx(2.0)
    assert temperature_at(10, 10, schedule, 2, 8) == pytest.approx(8.0)
    assert temperature_at(5, 10, schedule, 2, 8) == pytest.approx(5.0)
    assert temperature_at(12, 10, schedule, 2, 8) == pytest.approx(8.0)  # clipped after the run


def test_linear_and_cosine_shapes_differ_off_the_midpoint():
    assert temperature_at(2.5, 10, "linear", 2, 8) == pytest.approx(3.5)
    assert temperature_at(2.5, 10, "cosine", 2, 8) == pytest.approx(8 + (2 - 8) * (1 + math.cos(math.pi / 4)) / 2)
    assert temperature_at(7.5, 10, "cosine", 8, 2) == pytest.approx(2 + 6 * (1 + math.cos(3 * math.pi / 4)) / 2)


def test_step_levels():
    values = [temperature_at(e, 8, "step", 2, 8, steps=4) for e in (0, 1.9, 2, 4, 5.99, 6, 8)]
    assert values == pytest.approx([2, 2, 4, 6, 6, 8, 8])


def test_objective_sets_every_part_and_reports_temperature(logits):
    zs, zt, y = logits
    loss = CombinedLoss({"a": (create_loss("kd", temperature=1.0), 1.0), "b": (create_loss("dkd"), 1.0),
                         "c": (create_loss("mse_logits"), 1.0)})
    assert len(temperature_modules(loss)) == 2
    model = torch.nn.Linear(10, 10)
    with torch.no_grad():
        model.weight.copy_(torch.eye(10))
        model.bias.zero_()
    teacher = torch.nn.Linear(10, 10)
    obj = DistillObjective(loss, TeacherProvider([teacher]), alpha=0.5,
                           temperature=lambda e, n: temperature_at(e, n, "linear", 2, 8))
    obj.epochs = 10
    _, terms = obj(model, Batch(x=zs, y=y, idx=torch.arange(8), epoch=5.0))
    assert terms["temperature"].item() == pytest.approx(5.0)
    assert loss.parts["a"].temperature == pytest.approx(5.0) and loss.parts["b"].temperature == pytest.approx(5.0)


BASE = {"name": "s", "teacher": {"model": "test_resnet", "epochs": 1}, "student": {"model": "test_resnet"}}


def test_schedule_knobs_in_studies():
    (e,) = check_study(parse_study({**BASE, "losses": [
        {"name": "kd", "params": {"t_schedule": "cosine"},
         "search": {"t_start": {"low": 1, "high": 4}, "t_end": {"low": 4, "high": 10}}}]}))
    assert set(e.space) >= {"t_start", "t_end"} and "t_schedule" not in e.space
    f = e.schedule(e.values({"t_start": 1.0, "t_end": 9.0}))
    assert f(0, 10) == pytest.approx(1.0) and f(10, 10) == pytest.approx(9.0)
    assert e.schedule(e.values({"t_schedule": "constant"})) is None
    with pytest.raises(KdbenchError, match=r"loss 'mse_logits' has no temperature to schedule"):
        check_study(parse_study({**BASE, "losses": [{"name": "mse_logits", "params": {"t_schedule": "linear"}}]}))
    with pytest.raises(KdbenchError, match=r"t_schedule must be one of constant, linear, cosine, step"):
        check_study(parse_study({**BASE, "losses": [{"name": "kd", "params": {"t_schedule": "exp"}}]}))
    with pytest.raises(KdbenchError, match=r"t_start and t_end must be > 0"):
        check_study(parse_study({**BASE, "losses": [{"name": "kd", "params": {"t_schedule": "linear", "t_start": 0}}]}))
