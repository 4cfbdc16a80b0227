"""The offline teacher top-k record (kdkernels.TeacherTopK, kdkernels.topk.storage): made from
dense logits, saved, loaded, checked, and plugged into the top-k losses."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

from kdkernels import TeacherTopK, fused_linear_topk_kd_loss, topk_kd_loss
from kdkernels.topk import load_teacher_topk, save_teacher_topk, teacher_topk_from_logits
from kdkernels.topk.storage import FORMAT, FORMAT_VERSION


def _teacher(lead=(3, 5), v=211, std=30.0, dtype=torch.float32):
    return (torch.randn(*lead, v, dtype=torch.float64) * std).to(dtype)


@pytest.mark.parametrize("values", ["logits", "logprobs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_from_logits_matches_the_definition(values, dtype, tau):
    """Indices: the teacher's top-k (descending, ties by lower index); values: t/τ or
    log_softmax(t/τ) at them, from float64, rounded once into the stored dtype; a block
    size that does not divide N gives the same record as one block."""
    t = _teacher(dtype=dtype)
    rec = TeacherTopK.from_logits(t, 12, values=values, temperature=tau, rows_per_chunk=4)
    one = TeacherTopK.from_logits(t, 12, values=values, temperature=tau, rows_per_chunk=10**6)
    assert torch.equal(rec.indices, one.indices) and torch.equal(rec.values, one.values)
    t64 = t.double() / tau
    top = torch.sort(t64, dim=-1, descending=True, stable=True).indices[..., :12]
    assert rec.indices.dtype == torch.int32 and torch.equal(rec.indices, top.int())
    src = torch.log_softmax(t64, -1) if values == "logprobs" else t64
    want = src.gather(-1, top)
    assert rec.values.dtype == dtype and rec.values.shape == (3, 5, 12)
    eps = torch.finfo(dtype).eps
    assert torch.all((rec.values.double() - want).abs() <= eps * want.abs() + 1e-5)
    assert (rec.values_kind, rec.vocab_size, rec.k, rec.temperature) == (values, 211, 12, tau)


@pytest.mark.parametrize("values", ["logits", "logprobs"])
def test_round_trip_and_the_loss_of_the_loaded_record(values, tmp_path):
    t = _teacher()
    rec = TeacherTopK.from_logits(t, 16, values=values, dtype=torch.bfloat16,
                                  metadata={"teacher": "t-7b", "step": 3, "ok": True})
    path = tmp_path / "shard0.pt"
    rec.save(path)
    back = TeacherTopK.load(path)
    assert torch.equal(back.indices, rec.indices) and back.indices.dtype == torch.int32
    assert torch.equal(back.values, rec.values) and back.values.dtype == torch.bfloat16
    assert (back.values_kind, back.vocab_size, back.temperature, back.metadata) == (
        values, 211, 1.0, {"teacher": "t-7b", "step": 3, "ok": True})
    raw = torch.load(path, weights_only=True)  # the documented layout, readable without us
    assert raw["format"] == FORMAT and raw["version"] == FORMAT_VERSION
    assert (raw["k"], raw["dtype"], raw["values_kind"]) == (16, "bfloat16", values)
    # the loaded record plugs straight into the losses, with its own `values=` keyword
    s = torch.randn(3, 5, 211) * 30
    y = torch.randint(0, 211, (3, 5))
    y[0, 1] = -100
    a = topk_kd_loss(s, back.indices, back.values, y, **back.loss_kwargs())
    b = topk_kd_loss(s, rec.indices, rec.values, y, values=values)
    assert torch.equal(a, b)
    # ... and equals the loss on the teacher's top-k taken directly from the logits
    top = t.topk(16, -1)
    direct = top.values if values == "logits" else torch.log_softmax(t, -1).gather(
        -1, top.indices)
    c = topk_kd_loss(s, top.indices, direct, y, values=values)
    assert rel_err(a, c) <= 2e-2  # only the bf16 rounding of the stored values
    a32 = topk_kd_loss(s, back.indices, back.values.float(), y, values=values)
    assert torch.equal(a32, a)
    hs, ws = torch.randn(3, 5, 8), torch.randn(211, 8) * 10
    f = fused_linear_topk_kd_loss(hs, ws, back.indices, back.values, y, **back.loss_kwargs())
    g = topk_kd_loss(hs @ ws.t(), back.indices, back.values, y, values=values)
    assert rel_err(f, g) <= 1e-5


def test_function_forms_and_padding(tmp_path):
    idx = torch.tensor([[3, 0, -1, -1], [1, 2, 4, -1]], dtype=torch.int32)
    vals = torch.tensor([[-0.5, -1.5, 0.0, 0.0], [-1.0, -2.0, -3.0, 0.0]])
    rec = save_teacher_topk(tmp_path / "r.pt", idx, vals, values_kind="logprobs", vocab_size=5)
    back = load_teacher_topk(tmp_path / "r.pt")
    assert torch.equal(back.indices, idx) and torch.equal(back.values, vals) and back.k == 4
    assert rec.loss_kwargs() == {"values": "logprobs"}
    x = torch.randn(2, 9) * 9
    f, m = teacher_topk_from_logits(x, 3, values="logits"), TeacherTopK.from_logits(x, 3,
                                                                                    values="logits")
    assert torch.equal(f.indices, m.indices) and torch.equal(f.values, m.values)
    s = torch.randn(2, 5) * 5
    loss = topk_kd_loss(s, back.indices, back.values, tail="bucket", **back.loss_kwargs())
    assert torch.isfinite(loss) and loss > 0


def _ok():
    return dict(indices=torch.tensor([[0, 2, -1]], dtype=torch.int32),
                values=torch.tensor([[-0.1, -3.0, 0.0]]), values_kind="logprobs", vocab_size=4)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(indices=torch.tensor([[0, 2, -1]])), TypeError, "indices must be int32"),
        (dict(indices=[[0, 2, -1]]), TypeError, "indices must be a torch.Tensor"),
        (dict(values=torch.tensor([[-0.1, -3.0, 0.0]], dtype=torch.float64)), TypeError,
         "values must be bfloat16, float16 or float32"),
        (dict(values=torch.tensor([[1, 2, 3]])), TypeError, "values must be"),
        (dict(values=torch.zeros(1, 2)), ValueError, "values must have the shape of indices"),
        (dict(indices=torch.zeros(1, 0, dtype=torch.int32), values=torch.zeros(1, 0)),
         ValueError, "k >= 1"),
        (dict(indices=torch.tensor([[0, 4, -1]], dtype=torch.int32)), ValueError, "found 4"),
        (dict(indices=torch.tensor([[0, -2, 1]], dtype=torch.int32)), ValueError, "found -2"),
        (dict(indices=torch.tensor([[2, 2, -1]], dtype=torch.int32)), ValueError, "twice"),
        (dict(values=torch.tensor([[0.5, -3.0, 0.0]])), ValueError, "log-probabilities"),
        (dict(values_kind="probs"), ValueError, "values_kind"),
        (dict(vocab_size=2), ValueError, "vocab_size"),
        (dict(vocab_size=4.0), TypeError, "vocab_size"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(metadata={"f": lambda: 0}), TypeError, "metadata"),
        (dict(metadata={1: "x"}), TypeError, "metadata keys"),
    ],
)
def test_bad_records_are_refused(over, exc, match, tmp_path):
    args = dict(_ok(), **over)
    with pytest.raises(exc, match=match):
        TeacherTopK(**args)
    with pytest.raises(exc, match=match):
        save_teacher_topk(tmp_path / "x.pt", args.pop("indices"), args.pop("values"), **args)
    assert not (tmp_path / "x.pt").exists()


def test_bad_files_are_refused(tmp_path):
    good = TeacherTopK(**_ok()).state_dict()
    cases = [
        ({"indices": good["indices"]}, "not a teacher top-k record"),
        (dict(good, version=FORMAT_VERSION + 1), "newer than this kdkernels reads"),
        (dict(good, version="1"), "invalid version"),
        ({k: v for k, v in good.items() if k != "temperature"}, "lacks temperature"),
        (dict(good, k=5), "inconsistent"),
        (dict(good, dtype="float16"), "inconsistent"),
        (dict(good, indices=good["indices"].long()), "indices must be int32"),
    ]
    for i, (state, match) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        torch.save(state, path)
        with pytest.raises((ValueError, TypeError), match=match):
            TeacherTopK.load(path)


def test_from_logits_arguments():
    t = torch.randn(4, 10)
    with pytest.raises(ValueError, match="k must be"):
        TeacherTopK.from_logits(t, 11)
    with pytest.raises(ValueError, match="values must be one of"):
        TeacherTopK.from_logits(t, 3, values="probs")
    with pytest.raises(TypeError, match="dtype must be"):
        TeacherTopK.from_logits(t, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="temperature"):
        TeacherTopK.from_logits(t, 3, temperature=-1.0)
    with pytest.raises(TypeError, match="teacher_logits"):
        TeacherTopK.from_logits(t.long(), 3)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        TeacherTopK.from_logits(t, 3, rows_per_chunk=0)
    rec = TeacherTopK.from_logits(t.double(), 3)  # float64 logits: float32 values
    assert rec.dtype == torch.float32
