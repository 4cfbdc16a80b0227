"""kdkernels.integrations.transformers against the float64 oracles on tiny random models.

Every loss is compared with the oracle (kd/reference.py, topk/reference.py) applied in
float64 to the models' own logits, and the student's parameter gradients with the
gradients that oracle loss gives through the same model: Llama, Qwen2, Gemma2 (softcap),
Cohere (logit scale), tied embeddings, left and right padding, ignored labels, fused and
unfused, gradient accumulation, the Trainer and the TAID callback.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdkernels import TAIDSchedule, TeacherTopK  # noqa: E402
from kdkernels._core.backend import recording  # noqa: E402
from kdkernels.integrations.transformers import (  # noqa: E402
    HeadSpec,
    KDForCausalLM,
    KDTrainer,
    TAIDCallback,
    check_head,
    count_items,
    distillation_loss,
)
from kdkernels.kd.reference import kd_loss_ref  # noqa: E402
from kdkernels.topk.reference import topk_kd_loss_ref  # noqa: E402

transformers.utils.logging.set_verbosity_error()

V = 80
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # softcap 4 at logit spreads of std ~10: the cap changes every logit substantially
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 4.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 3.0}),
}


def make_model(family: str, hidden: int, seed: int, spread: float, **over):
    """A 2-layer random model whose logits have a standard deviation of about `spread`
    (the head's rows are drawn with that norm; the final norm makes |h| ~ sqrt(hidden))."""
    cfg_name, cls_name, extra = FAMILIES[family]
    kw = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=hidden // 4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(extra)
    kw.update(over)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kw)).float()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, spread / hidden ** 0.5)
    return model


def pair(student_family="llama", teacher_family=None, **over):
    teacher = make_model(teacher_family or student_family, 48, 1, 12.0, **over).eval()
    student = make_model(student_family, 32, 2, 8.0, **over)
    return student, teacher


def batch(b=3, t=9, seed=3):
    """Row 0 left-padded, row 1 right-padded, row 2 with an ignored prompt; row 3+ full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    if b > 1:
        mask[1, t - 3:] = 0
    labels = ids.clone()
    if b > 2:
        labels[2, :3] = -100
    return ids, mask, labels


def targets(ids, mask, labels):
    """Position i's target: labels[i+1] when both i and i+1 are tokens, else -100."""
    y = torch.full_like(labels, -100)
    ok = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    y[:, :-1] = torch.where(ok, labels[:, 1:], -100)
    return y


def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def integration(kd, student, teacher, ids, mask, labels, **kw):
    student.zero_grad(set_to_none=True)
    loss = kd(student, teacher, input_ids=ids, attention_mask=mask, labels=labels, **kw)
    loss.backward()
    return loss.detach(), grads(student)


def oracle(student, teacher, ids, mask, labels, **kw):
    """The float64 kd_loss oracle on the models' own logits, and its gradients."""
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = logits(teacher, ids, mask)
    ref = kd_loss_ref(logits(student, ids, mask), t, targets(ids, mask, labels), **kw)
    ref.backward()
    return ref.detach(), grads(student)


def assert_close_grads(got, want, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-30)
        err = (got[name] - want[name]).abs().max() / scale
        assert err <= rtol, f"{name}: relative gradient error {err:.3g}"


KD_CASES = [
    ("llama", None, {}),
    ("llama", None, {"tie_word_embeddings": True}),
    ("qwen2", None, {}),
    ("gemma2", None, {}),
    ("cohere", None, {}),
    ("granite", None, {}),
    ("llama", "gemma2", {}),  # a softcapped teacher for a plain student
]


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("student_family,teacher_family,over", KD_CASES,
                         ids=["llama", "llama-tied", "qwen2", "gemma2", "cohere", "granite",
                              "gemma2-to-llama"])
def test_kd_matches_oracle(student_family, teacher_family, over, fused):
    student, teacher = pair(student_family, teacher_family, **over)
    if over.get("tie_word_embeddings"):
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    ids, mask, labels = batch()
    opts = dict(temperature=2.0, hard_label_weight=0.1)
    kd = KDForCausalLM(fused=fused, divergence="forward_kl", **opts)
    with recording() as calls:
        loss, g = integration(kd, student, teacher, ids, mask, labels)
    assert {op for op, _ in calls} >= {"fused_linear_kd_loss" if fused else "kd_loss"}
    ref, g_ref = oracle(student, teacher, ids, mask, labels, **opts)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    assert_close_grads(g, g_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("divergence,extra", [
    ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("tvd", {}), ("taid", {"taid_t": 0.6}),
])
def test_divergences(divergence, extra, fused):
    student, teacher = pair("llama")
    ids, mask, labels = batch()
    kd = KDForCausalLM(fused=fused, divergence=divergence, **extra)
    loss, g = integration(kd, student, teacher, ids, mask, labels)
    ref, g_ref = oracle(student, teacher, ids, mask, labels, divergence=divergence, **extra)
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-7)
    assert_close_grads(g, g_ref)


def test_fused_never_makes_logits():
    """Both heads see an empty slice of positions: no [B, T, V] logits exist."""
    student, teacher = pair("gemma2")
    shapes = []
    hooks = [m.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(out.shape))) for m in (student, teacher)]
    ids, mask, labels = batch()
    KDForCausalLM(fused=True, check_head=False)(student, teacher, input_ids=ids,
                                                attention_mask=mask, labels=labels)
    for h in hooks:
        h.remove()
    assert shapes == [(3, 0, V), (3, 0, V)]


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_gradient_accumulation_equals_one_batch(fused):
    """Two micro-batches with num_items_in_batch = the whole batch's count give the loss
    and the gradients of the whole batch at once."""
    student, teacher = pair("qwen2")
    ids, mask, labels = batch(b=5, t=8)
    kd = KDForCausalLM(fused=fused, temperature=1.5)
    whole, g_whole = integration(kd, student, teacher, ids, mask, labels)
    parts = [slice(0, 2), slice(2, 5)]
    n = sum(count_items(ids[p], mask[p], labels[p]) for p in parts)
    assert int(n) == int((targets(ids, mask, labels) != -100).sum())
    student.zero_grad(set_to_none=True)
    total = 0.0
    for p in parts:
        loss = kd(student, teacher, input_ids=ids[p], attention_mask=mask[p],
                  labels=labels[p], num_items_in_batch=n)
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(total, whole, rtol=2e-6, atol=0)
    assert_close_grads(grads(student), g_whole)
    ref, _ = oracle(student, teacher, ids, mask, labels, temperature=1.5)
    torch.testing.assert_close(total.double(), ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("n", [0, "tensor"])
def test_no_valid_tokens_gives_zero(fused, n):
    student, teacher = pair("llama")
    ids, mask, _ = batch()
    labels = torch.full_like(ids, -100)
    n = torch.tensor(0) if n == "tensor" else n
    kd = KDForCausalLM(fused=fused)
    loss, g = integration(kd, student, teacher, ids, mask, labels, num_items_in_batch=n)
    assert loss.item() == 0.0
    assert all(bool((v == 0).all()) for v in g.values())


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("values", ["logits", "logprobs"])
def test_topk_on_the_fly(fused, values):
    student, teacher = pair("gemma2")
    ids, mask, labels = batch()
    temperature = 2.0 if values == "logits" else 1.0
    kd = KDForCausalLM(loss="topk", fused=fused, top_k=6, topk_values=values,
                       temperature=temperature)
    loss, g = integration(kd, student, teacher, ids, mask, labels)
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        t = logits(teacher, ids, mask).double()
    top, idx = t.topk(6, dim=-1)
    if values == "logprobs":
        top = top - t.logsumexp(-1, keepdim=True)
    ref = topk_kd_loss_ref(logits(student, ids, mask), idx, top, targets(ids, mask, labels),
                           values=values, temperature=temperature)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    assert_close_grads(g, grads(student))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_topk_stored_record(fused):
    student, teacher = pair("cohere")
    ids, mask, labels = batch()
    with torch.no_grad():
        t = logits(teacher, ids, mask)
    rec = TeacherTopK.from_logits(t, 5, values="logprobs", dtype=torch.float32)
    kd = KDForCausalLM(loss="topk", fused=fused)
    loss, g = integration(kd, student, None, ids, mask, labels, teacher_topk=rec)
    student.zero_grad(set_to_none=True)
    ref = topk_kd_loss_ref(logits(student, ids, mask), rec.indices.long(), rec.values,
                           targets(ids, mask, labels), values="logprobs")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    assert_close_grads(g, grads(student))


def test_function_form_and_shift_labels():
    student, teacher = pair("llama")
    ids, mask, labels = batch()
    loss = distillation_loss(student, teacher,
                             {"input_ids": ids, "attention_mask": mask, "labels": labels},
                             fused=True, temperature=2.0)
    y = targets(ids, mask, labels)
    with torch.no_grad():
        ref = kd_loss_ref(logits(student, ids, mask), logits(teacher, ids, mask), y,
                          temperature=2.0)
        pre = KDForCausalLM(fused=False, temperature=2.0)(
            student, teacher, input_ids=ids, attention_mask=mask, shift_labels=y)
    torch.testing.assert_close(loss.detach().double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(pre.double(), ref, rtol=2e-6, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_autocast_bf16_fused_matches_logits_path(family):
    """Under CPU autocast the fused path computes the head's matmul in bfloat16, as the
    model's own nn.Linear does: the two paths agree to bfloat16 rounding (and the head
    check accepts a softcap the model rounds in bfloat16)."""
    student, teacher = pair(family)
    ids, mask, labels = batch()
    out = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.append(KDForCausalLM(fused=fused)(student, teacher, input_ids=ids,
                                                  attention_mask=mask, labels=labels))
    assert out[1].dtype == torch.float32
    torch.testing.assert_close(out[1], out[0], rtol=3e-2, atol=0)


# -- the head ----------------------------------------------------------------------------


def test_head_spec_from_config():
    assert HeadSpec.from_config(transformers.Gemma2Config(final_logit_softcapping=7.0)) == \
        HeadSpec(softcap=7.0)
    assert HeadSpec.from_config(transformers.CohereConfig(logit_scale=0.3)) == \
        HeadSpec(logit_scale=0.3)
    assert HeadSpec.from_config(transformers.GraniteConfig(logits_scaling=4.0)) == \
        HeadSpec(logit_scale=0.25)
    assert HeadSpec.from_config(transformers.LlamaConfig()) == HeadSpec()
    with pytest.raises(ValueError, match="softcap"):
        HeadSpec(softcap=0.0)


@pytest.mark.parametrize("cfg_name,cls_name,kw", [
    ("Cohere2Config", "Cohere2ForCausalLM", {"logit_scale": 0.3}),
    ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 3.0}),
    ("GraniteMoeConfig", "GraniteMoeForCausalLM", {"logits_scaling": 4.0}),
    ("HyperCLOVAXConfig", "HyperCLOVAXForCausalLM", {"logits_scaling": 4.0}),
])
def test_config_rule_reproduces_the_models_logits(cfg_name, cls_name, kw):
    """The rule read from the config passes the check against the model's own logits, and
    the plain head (no transform) fails it."""
    cfg = getattr(transformers, cfg_name)(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 10.0 / 32 ** 0.5)
    ids = torch.randint(3, V, (2, 8))
    check_head(model, HeadSpec.from_config(model.config), ids, "model")
    with pytest.raises(ValueError, match="does not reproduce the model's own logits"):
        check_head(model, HeadSpec(), ids, "model")


def test_wrong_head_spec_is_refused_before_the_loss():
    student, teacher = pair("gemma2")
    ids, mask, labels = batch()
    kd = KDForCausalLM(fused=True, teacher_head=HeadSpec())  # ignores Gemma2's softcap
    with recording() as calls, pytest.raises(ValueError, match="teacher"):
        kd(student, teacher, input_ids=ids, attention_mask=mask, labels=labels)
    assert calls == []


def test_validation():
    with pytest.raises(TypeError, match="beta_typo"):
        KDForCausalLM(beta_typo=0.5)
    with pytest.raises(TypeError, match="normalizer"):
        KDForCausalLM(normalizer=3)
    with pytest.raises(ValueError, match="loss"):
        KDForCausalLM(loss="dense")
    student, teacher = pair("llama")
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="top_k"):
        KDForCausalLM(loss="topk")(student, teacher, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        KDForCausalLM()(student, teacher, input_ids=ids, attention_mask=mask[:, :-1])
    with pytest.raises(ValueError, match="teacher is None"):
        KDForCausalLM()(student, None, input_ids=ids)
    with pytest.raises(ValueError, match="output head"):
        KDForCausalLM()(student.model, teacher, input_ids=ids)


# -- Trainer and TAID --------------------------------------------------------------------


def _dataset(n=4, t=8):
    ids, mask, labels = batch(b=n, t=t, seed=5)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2,
                gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
                dataloader_num_workers=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_trainer_step_is_the_whole_batch_gradient(tmp_path, fused):
    """One SGD step (lr 1) of KDTrainer over 2 accumulated micro-batches moves every
    parameter by minus the gradient of the oracle's mean over all four sequences."""
    student, teacher = pair("llama")
    rows = _dataset()
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["attention_mask"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    _, g_ref = oracle(student, teacher, ids, mask, labels, temperature=2.0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    kd = KDForCausalLM(fused=fused, temperature=2.0)
    trainer = KDTrainer(model=student, teacher_model=teacher, kd=kd, args=_args(tmp_path),
                        train_dataset=rows)
    trainer.train()
    step = {n: before[n] - p.detach() for n, p in student.named_parameters() if n in g_ref}
    assert_close_grads(step, g_ref, rtol=2e-4)


def test_taid_callback_feeds_each_step(tmp_path):
    student, teacher = pair("llama")
    sched = TAIDSchedule(t_start=0.3, t_end=1.0)
    kd = KDForCausalLM(divergence="taid", fused=True)
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((state.global_step, sched.prev_loss, kd.taid_t))

    cb = TAIDCallback(sched, kd)
    assert kd.taid_t == 0.3
    trainer = KDTrainer(model=student, teacher_model=teacher, kd=kd,
                        args=_args(tmp_path, max_steps=3, learning_rate=1e-2, optim="adamw_torch"),
                        train_dataset=_dataset(n=12), callbacks=[cb, Spy()])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [s for s, _, _ in seen] == [1, 2, 3]
    for (_, fed, _), shown in zip(seen, logged):  # the step's loss, as Trainer logs it
        assert fed == pytest.approx(shown, rel=1e-3)
    ref = TAIDSchedule(t_start=0.3, t_end=1.0)
    for step, fed, t in seen:
        assert ref.step(fed, global_step=step - 1, total_steps=3) == pytest.approx(t, abs=1e-12)
    assert seen[-1][2] > 0.3


def test_taid_callback_needs_taid():
    with pytest.raises(ValueError, match="taid"):
        TAIDCallback(TAIDSchedule(), KDForCausalLM(divergence="forward_kl"))


# -- optional import ---------------------------------------------------------------------


def test_kdkernels_does_not_import_transformers():
    code = ("import sys, kdkernels, kdkernels.integrations; "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_transformers_says_how_to_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import kdkernels.integrations.transformers\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "pip install transformers" in out
