"""torch.compile(fullgraph=True) traces every public loss without graph breaks."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

import kdkernels as K

B, V = 6, 50


def _inputs():
    s = torch.randn(B, V) * 4
    t = torch.randn(B, V) * 4
    y = torch.randint(0, V, (B,))
    y[1] = -100
    return s, t, y


CASES = {
    "kd_loss": lambda s, t, y: K.kd_loss(s, t, y, divergence="skew_reverse_kl"),
    "fused_linear_kd_loss": lambda s, t, y: K.fused_linear_kd_loss(
        s[:, :7], torch.linspace(-1, 1, V * 7).view(V, 7), t[:, :5],
        torch.linspace(1, -1, V * 5).view(V, 5), y, divergence="jsd"),
    "plackett_luce_loss": lambda s, t, y: K.plackett_luce_loss(s, t, y, top_k=5),
    "sinkhorn_loss": lambda s, t, y: K.sinkhorn_loss(s, t, n_iters=5),
    "topk_kd_loss": lambda s, t, y: K.topk_kd_loss(s, t.topk(5).indices, t.topk(5).values, y),
    "graph_on_logits_loss": lambda s, t, y: K.graph_on_logits_loss(
        s.view(2, 3, V), t.view(2, 3, V), 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fullgraph_compile_matches_eager(name):
    fn = CASES[name]
    s, t, y = _inputs()
    s1 = s.clone().requires_grad_(True)
    ref = fn(s1, t, y)
    ref.backward()
    s2 = s.clone().requires_grad_(True)
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(s2, t, y)
    out.backward()
    assert rel_err(out.detach(), ref.detach()) <= 1e-6
    assert rel_err(s2.grad, s1.grad) <= 1e-6
