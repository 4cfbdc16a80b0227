"""Bad input to kd_loss raises ValueError/TypeError naming the argument, before any kernel."""

from __future__ import annotations

import pytest
import torch

from kdkernels import BackendUnavailableError, kd_loss


def good():
    s = torch.randn(4, 3, 50) * 5
    t = torch.randn(4, 3, 50) * 5
    y = torch.randint(0, 50, (4, 3))
    return s, t, y


CASES = [
    # (description, mutate(s, t, y, kw) -> (s, t, y, kw), exception, pattern)
    ("student not a tensor", lambda s, t, y, kw: (s.tolist(), t, y, kw), TypeError,
     "student_logits"),
    ("integer student", lambda s, t, y, kw: (s.long(), t, y, kw), TypeError, "student_logits"),
    ("integer teacher", lambda s, t, y, kw: (s, t.int(), y, kw), TypeError, "teacher_logits"),
    ("0-dim logits", lambda s, t, y, kw: (s[0, 0, 0], t, y, kw), ValueError, "student_logits"),
    ("leading shapes differ", lambda s, t, y, kw: (s, t[:2], y, kw), ValueError,
     "leading shape"),
    ("vocab mismatch", lambda s, t, y, kw: (s, t[..., :40], y, kw), ValueError,
     "vocab_mismatch"),
    ("unknown vocab_mismatch", lambda s, t, y, kw: (s, t, y, {**kw, "vocab_mismatch": "pad"}),
     ValueError, "vocab_mismatch"),
    ("empty vocab", lambda s, t, y, kw: (s[..., :0], t[..., :0], None, kw), ValueError,
     "vocabulary"),
    ("float labels", lambda s, t, y, kw: (s, t, y.float(), kw), TypeError, "labels"),
    ("label shape", lambda s, t, y, kw: (s, t, y[:, :2], kw), ValueError, "labels"),
    ("label too large", lambda s, t, y, kw: (s, t, torch.full_like(y, 50), kw), ValueError,
     "labels"),
    ("negative label", lambda s, t, y, kw: (s, t, torch.full_like(y, -3), kw), ValueError,
     "labels"),
    ("unknown divergence", lambda s, t, y, kw: (s, t, y, {**kw, "divergence": "kl"}),
     ValueError, "divergence"),
    ("unknown reduction", lambda s, t, y, kw: (s, t, y, {**kw, "reduction": "avg"}),
     ValueError, "reduction"),
    ("unknown backend", lambda s, t, y, kw: (s, t, y, {**kw, "backend": "cpu"}), ValueError,
     "backend"),
    ("temperature 0", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": 0.0}), ValueError,
     "temperature"),
    ("temperature nan", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": float("nan")}),
     ValueError, "temperature"),
    ("temperature str", lambda s, t, y, kw: (s, t, y, {**kw, "temperature": "1"}), TypeError,
     "temperature"),
    ("beta > 1", lambda s, t, y, kw: (s, t, y, {**kw, "beta": 1.5}), ValueError, "beta"),
    ("alpha < 0", lambda s, t, y, kw: (s, t, y, {**kw, "alpha": -0.1}), ValueError, "alpha"),
    ("taid_t > 1", lambda s, t, y, kw: (s, t, y, {**kw, "taid_t": 2.0}), ValueError, "taid_t"),
    ("taid without t", lambda s, t, y, kw: (s, t, y, {**kw, "divergence": "taid"}), ValueError,
     "taid_t"),
    ("hard labels without labels",
     lambda s, t, y, kw: (s, t, None, {**kw, "hard_label_weight": 0.5}), ValueError, "labels"),
    ("negative hard weight", lambda s, t, y, kw: (s, t, y, {**kw, "hard_label_weight": -1.0}),
     ValueError, "hard_label_weight"),
    ("inf soft weight",
     lambda s, t, y, kw: (s, t, y, {**kw, "soft_label_weight": float("inf")}), ValueError,
     "soft_label_weight"),
    ("ignore_index float", lambda s, t, y, kw: (s, t, y, {**kw, "ignore_index": 1.5}),
     TypeError, "ignore_index"),
    ("normalizer 0", lambda s, t, y, kw: (s, t, y, {**kw, "normalizer": 0}), ValueError,
     "normalizer"),
    ("normalizer vector",
     lambda s, t, y, kw: (s, t, y, {**kw, "normalizer": torch.ones(2)}), ValueError,
     "normalizer"),
    ("meta teacher", lambda s, t, y, kw: (s, t.to("meta"), y, kw), ValueError,
     "teacher_logits"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_argument(case):
    _, mutate, exc, pattern = case
    s, t, y = good()
    s, t, y, kw = mutate(s, t, y, {})
    with pytest.raises(exc, match=pattern):
        kd_loss(s, t, y, **kw)


def test_good_input_passes():
    s, t, y = good()
    assert torch.isfinite(kd_loss(s, t, y))


def test_bad_env_backend(monkeypatch):
    monkeypatch.setenv("KDKERNELS_BACKEND", "gpu")
    s, t, y = good()
    with pytest.raises(ValueError, match="KDKERNELS_BACKEND"):
        kd_loss(s, t, y)


def test_explicit_unavailable_backend_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, t, y = good()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET|CUDA"):
        kd_loss(s, t, y, backend="triton")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        kd_loss(s, t, y, backend="cuda")
