"""TAIDSchedule against TAID's published update rule, transcribed independently below in
float32 tensors (as the official implementation keeps its state)."""

from __future__ import annotations

import math

import pytest
import torch

from kdkernels import TAIDSchedule


class OfficialRule:
    """TAID's t update: the first call records the loss; then momentum of the relative
    loss change, t += α·sigmoid(m)·(1 − t), floored by the linear schedule, capped at
    t_end. State in float32 tensors."""

    def __init__(self, t_start, t_end, alpha, beta):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = torch.tensor(t_start, dtype=torch.float32)
        self.prev = torch.tensor(math.inf, dtype=torch.float32)
        self.m = torch.zeros((), dtype=torch.float32)

    def update(self, loss, step, total):
        loss = torch.tensor(loss, dtype=torch.float32)
        if torch.isinf(self.prev):
            self.prev = loss
            return float(self.t)
        rel = (self.prev - loss) / (self.prev + 1e-15)
        self.m = self.beta * self.m + (1 - self.beta) * rel
        target = self.t_start + (self.t_end - self.t_start) * step / total
        inc = self.alpha * torch.sigmoid(self.m) * (1 - self.t)
        self.t = torch.as_tensor(min(self.t_end, max(target, float(self.t + inc))),
                                 dtype=torch.float32)
        self.prev = loss
        return float(self.t)


def _losses(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.arange(n, dtype=torch.float64)
    noise = 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    return (3.0 * torch.exp(-k / 1500) + 0.4 + noise).tolist()


@pytest.mark.parametrize("t_start, alpha, beta, total", [(0.2, 5e-4, 0.99, 125_000),
                                                        (0.4, 5e-3, 0.9, 3_000)])
def test_matches_the_official_rule_step_for_step(t_start, alpha, beta, total):
    ours = TAIDSchedule(t_start=t_start, t_end=1.0, step_size=alpha, beta=beta)
    ref = OfficialRule(t_start, 1.0, alpha, beta)
    for step, loss in enumerate(_losses(4000)):
        assert ours.step(loss, step, total) == pytest.approx(ref.update(loss, step, total),
                                                             abs=2e-6)
    assert t_start < ours.t <= 1.0


def test_first_step_only_records_and_the_one_minus_t_factor():
    s = TAIDSchedule(t_start=0.3, step_size=0.1, beta=0.0)
    assert s.step(2.0, 0, 10**9) == 0.3  # the first call moves nothing
    t = 0.3
    for k in range(1, 50):  # a constant loss: m = 0, sigmoid 1/2, t += α/2·(1 − t)
        t = t + 0.05 * (1 - t)
        assert s.step(2.0, k, 10**9) == pytest.approx(t, abs=1e-12)


def test_a_zero_loss_then_a_positive_one_does_not_crash():
    s = TAIDSchedule()
    s.step(0.0, 0, 100)
    for k in range(1, 100):  # relative change ≈ −1e15: sigmoid(m) underflows to 0, no error
        t = s.step(1.0, k, 100)
        assert math.isfinite(t) and 0.4 + 0.6 * k / 100 - 1e-12 <= t <= 1.0


def test_non_finite_losses_are_skipped_and_state_round_trips():
    s = TAIDSchedule(step_size=0.05)
    for k, loss in enumerate([5.0, 4.0, math.nan, math.inf, 3.0]):
        s.step(loss, k, 20)
    ref = TAIDSchedule(step_size=0.05)
    for k, loss in ((0, 5.0), (1, 4.0), (4, 3.0)):
        ref.step(loss, k, 20)
    assert {k: v for k, v in s.state_dict().items() if k != "num_steps"} == \
        {k: v for k, v in ref.state_dict().items() if k != "num_steps"}
    other = TAIDSchedule()
    other.load_state_dict(s.state_dict())
    assert other.step(2.5, 5, 20) == s.step(2.5, 5, 20)


def test_linear_schedule_without_adaptation():
    s = TAIDSchedule(t_start=0.2, t_end=0.8, adaptive=False)
    s.step(1.0, 0, 10)
    assert s.step(0.5, 5, 10) == pytest.approx(0.5)
    assert s.step(0.1, 10, 10) == pytest.approx(0.8)


def test_total_steps_once_and_the_own_step_count():
    """total_steps given to the constructor and no global_step: the same t as passing
    both on every call, global_step counting from 0."""
    losses = _losses(300, seed=3)
    explicit = TAIDSchedule(step_size=5e-3, beta=0.9)
    counted = TAIDSchedule(step_size=5e-3, beta=0.9, total_steps=400)
    for k, loss in enumerate(losses):
        assert counted.step(loss) == explicit.step(loss, k, 400)
    assert counted.num_steps == len(losses)
    # a given global_step resets the count; total_steps in step() wins over the stored one
    a = TAIDSchedule(t_start=0.2, adaptive=False, total_steps=10)
    a.step(1.0, global_step=4)
    assert a.step(1.0) == pytest.approx(0.2 + 0.8 * 5 / 10)
    assert a.step(1.0, total_steps=100) == pytest.approx(0.2 + 0.8 * 6 / 100)


def test_total_steps_is_required_somewhere():
    s = TAIDSchedule()
    with pytest.raises(ValueError, match="total_steps"):
        s.step(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        s.step(1.0, global_step=3)
    with pytest.raises(ValueError, match="total_steps"):
        TAIDSchedule(total_steps=0)


def test_the_step_count_round_trips():
    s = TAIDSchedule(step_size=0.05, total_steps=50)
    for loss in (5.0, 4.0, 3.5):
        s.step(loss)
    other = TAIDSchedule(step_size=0.05, total_steps=50)
    other.load_state_dict(s.state_dict())
    assert other.step(3.0) == s.step(3.0)
    old = {k: v for k, v in s.state_dict().items() if k != "num_steps"}  # older checkpoint
    other.load_state_dict(old)
    assert other.num_steps == 0


def test_alpha_is_a_deprecated_name_of_step_size():
    with pytest.warns(DeprecationWarning, match="step_size"):
        old = TAIDSchedule(alpha=0.05, total_steps=30)
    new = TAIDSchedule(step_size=0.05, total_steps=30)
    assert old.step_size == 0.05
    for loss in (4.0, 3.0, 2.9, 2.5):
        assert old.step(loss) == new.step(loss)
    with pytest.warns(DeprecationWarning):
        assert new.alpha == 0.05
    with pytest.raises(TypeError, match="step_size"):
        TAIDSchedule(alpha=0.05, step_size=0.05)
    with pytest.raises(ValueError, match="step_size"):
        TAIDSchedule(step_size=1.5)
