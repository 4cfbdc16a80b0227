"""Arguments that used to be accepted silently or rejected without naming themselves."""

from __future__ import annotations

import pytest
import torch

import kdkernels as K

LABELLED = {
    "kd_loss": lambda **kw: K.kd_loss(torch.randn(4, 9), torch.randn(4, 9), **kw),
    "plackett_luce_loss": lambda **kw: K.plackett_luce_loss(torch.randn(4, 9),
                                                            torch.randn(4, 9), **kw),
    "topk_kd_loss": lambda **kw: K.topk_kd_loss(torch.randn(4, 9), torch.arange(3).repeat(4, 1),
                                                torch.randn(4, 3), **kw),
    "fused_linear_kd_loss": lambda **kw: K.fused_linear_kd_loss(
        torch.randn(4, 5), torch.randn(9, 5), torch.randn(4, 3), torch.randn(9, 3), **kw),
}


@pytest.mark.parametrize("op", sorted(LABELLED))
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_normalizer_needs_mean(op, reduction):
    with pytest.raises(ValueError, match="normalizer is the denominator of reduction='mean'"):
        LABELLED[op](reduction=reduction, normalizer=8.0)


@pytest.mark.parametrize("op", sorted(LABELLED))
def test_normalizer_on_another_device_is_named(op):
    with pytest.raises(ValueError, match="normalizer is a tensor on meta"):
        LABELLED[op](normalizer=torch.tensor(3.0, device="meta"))


def test_sinkhorn_marginals_must_carry_equal_mass():
    c = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="same total mass"):
        K.sinkhorn(c, torch.full((3,), 0.5), torch.full((4,), 0.25), epsilon=0.1, n_iters=2)
    with pytest.raises(ValueError, match="same total mass"):  # b left uniform: mass 1
        K.sinkhorn(c, torch.full((3,), 0.5), epsilon=0.1, n_iters=2)
    f, g = K.sinkhorn(c, torch.full((3,), 2 / 3), torch.full((4,), 0.5), epsilon=0.1,
                      n_iters=2)  # equal (non-unit) mass is balanced OT: accepted
    assert torch.isfinite(f).all() and torch.isfinite(g).all()


def test_graph_integer_mask_holds_zeros_and_ones():
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.ones(2, 3, dtype=torch.int64)
    mask[1, 2] = 2
    with pytest.raises(ValueError, match="integer mask must hold 0 .* or 1"):
        K.graph_on_logits_loss(s, t, 3, mask=mask)
    mask[1, 2] = 0
    assert torch.isfinite(K.graph_on_logits_loss(s, t, 3, mask=mask))
