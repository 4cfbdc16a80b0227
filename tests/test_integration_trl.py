"""kdkernels.integrations.trl: the drop-ins give TRL's own numbers.

The reference is trl's code itself when trl is installed (GKDTrainer.generalized_jsd_loss,
DistillationTrainer's _chunked_divergence_loss), evaluated on float64 copies of the inputs;
without trl, a transcription of its formula below (checked against trl when both exist).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_lowp, rel_err

from kdkernels._core.backend import recording
from kdkernels.integrations import trl as kdtrl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.trainer import distillation_trainer as trl_distill
except ImportError:
    GKDTrainer = GKDConfig = trl_distill = None

requires_trl = pytest.mark.skipif(GKDTrainer is None, reason="needs trl")

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


# --- the formula as trl 1.x writes it (used when trl is absent) ---------------------------


def port_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                              temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    lq = F.log_softmax(student_logits / temperature, -1)
    lp = F.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = lp.exp() * (lp - lq)
    elif beta == 1:
        jsd = lq.exp() * (lq - lp)
    else:
        lm = torch.logsumexp(torch.stack([lq + math.log1p(-beta), lp + math.log(beta)]), 0)
        jsd = beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        den = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / den
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def trl_jsd(*args, **kwargs):
    fn = GKDTrainer.generalized_jsd_loss if GKDTrainer is not None else port_generalized_jsd_loss
    return fn(*args, **kwargs)


def _inputs(shape=(2, 5, 37), std=10.0, masked=((0, 1), (1, 3))):
    s = torch.randn(shape) * std
    t = torch.randn(shape) * std * 1.5
    labels = torch.randint(0, shape[-1], shape[:-1])
    for i in masked:
        labels[i] = -100
    return s, t, labels


def _grad_of(fn, s, upstream=None):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s)
    (out if upstream is None else out * upstream).sum().backward()
    return out.detach(), s.grad


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_generalized_jsd_loss_matches_trl(beta, reduction, with_labels, temperature):
    s, t, labels = _inputs()
    labels = labels if with_labels else None
    kw = dict(beta=beta, temperature=temperature, reduction=reduction)
    ref_shape = trl_jsd(s, t, labels, **kw).shape
    up = torch.rand(ref_shape, dtype=torch.float64) + 0.5 if reduction == "none" else None
    ref, ref_g = _grad_of(lambda x: trl_jsd(x, t.double(), labels, **kw), s.double(), up)
    low, low_g = _grad_of(lambda x: trl_jsd(x, t, labels, **kw), s, up)
    with recording() as ran:
        ours, ours_g = _grad_of(lambda x: kdtrl.generalized_jsd_loss(x, t, labels, **kw), s, up)
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert ("kd_loss", "torch") in ran or reduction == "none"
    assert_lowp(ours, low, ref, torch.float32, slack=1e-6 * ref.abs().max().item())
    assert_lowp(ours_g, low_g, ref_g, torch.float32, measure=rel_err, slack=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_overrides_the_reduction(beta, reduction, as_tensor):
    s, t, labels = _inputs()
    n = torch.tensor(23) if as_tensor else 23
    kw = dict(beta=beta, reduction=reduction, num_items_in_batch=n)
    ref, ref_g = _grad_of(lambda x: trl_jsd(x, t.double(), labels, **kw), s.double())
    ours, ours_g = _grad_of(lambda x: kdtrl.generalized_jsd_loss(x, t, labels, **kw), s)
    assert ours.shape == ref.shape == ()
    torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=1e-6)
    assert rel_err(ours_g, ref_g) < 1e-5


def test_only_minus_100_is_masked():
    """TRL masks label -100 and nothing else: -1 or ids beyond V still count."""
    s, t, labels = _inputs()
    labels[0, 0], labels[1, 1], labels[1, 2] = -1, 10_000, -100
    for reduction in ("batchmean", "mean"):
        ref = trl_jsd(s.double(), t.double(), labels, beta=0.3, reduction=reduction)
        ours = kdtrl.generalized_jsd_loss(s, t, labels, beta=0.3, reduction=reduction)
        torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=1e-6)


def test_all_masked_gives_zero_and_no_gradient():
    s, t, labels = _inputs()
    labels.fill_(-100)
    ref = trl_jsd(s, t, labels, reduction="batchmean")
    for reduction in ("batchmean", "sum", "mean"):  # TRL's "mean" is NaN here (empty mean)
        loss, g = _grad_of(lambda x, r=reduction: kdtrl.generalized_jsd_loss(
            x, t, labels, reduction=r), s)
        assert loss.item() == 0.0 == ref.item()
        assert torch.count_nonzero(g) == 0
    assert kdtrl.generalized_jsd_loss(s, t, labels, reduction="none").shape == (0, s.shape[-1])


def test_minus_inf_in_both_models_is_a_mask():
    """A column that is −inf for student and teacher (a vocabulary mask) contributes 0: the
    loss is TRL's on the other columns (TRL's own formula gives NaN there, 0·(−inf))."""
    s, t, labels = _inputs()
    s[..., -1] = t[..., -1] = -math.inf
    for beta in (0.0, 0.5, 1.0):
        ref = trl_jsd(s[..., :-1].double(), t[..., :-1].double(), labels, beta=beta)
        ours, g = _grad_of(lambda x, b=beta: kdtrl.generalized_jsd_loss(x, t, labels, beta=b),
                           s)
        torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=1e-6)
        assert torch.all(g[..., -1] == 0) and torch.isfinite(g).all()


def test_teacher_is_a_constant_and_bad_arguments_raise():
    s, t, labels = _inputs()
    t = t.requires_grad_(True)
    kdtrl.generalized_jsd_loss(s.requires_grad_(True), t, labels).backward()
    assert t.grad is None
    with pytest.raises(ValueError, match="reduction"):
        kdtrl.generalized_jsd_loss(s, t, labels, reduction="avg")
    with pytest.raises(TypeError, match="labels"):
        kdtrl.generalized_jsd_loss(s, t, labels.float())
    with pytest.raises(ValueError, match="beta"):
        kdtrl.generalized_jsd_loss(s, t, labels, beta=1.5)


@requires_trl
def test_port_is_trls_formula():
    """The transcription above (the reference without trl) is trl's function."""
    s, t, labels = _inputs()
    for beta in BETAS:
        for reduction in REDUCTIONS:
            for lab in (labels, None):
                a = GKDTrainer.generalized_jsd_loss(s.double(), t.double(), lab, beta=beta,
                                                    temperature=1.7, reduction=reduction)
                b = port_generalized_jsd_loss(s.double(), t.double(), lab, beta=beta,
                                              temperature=1.7, reduction=reduction)
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- DistillationTrainer's loss on hidden states and LM heads ----------------------------


def port_chunked_divergence_loss(h_s, h_t, w_s, w_t, mask, beta, num_items_in_batch=None,
                                 b_s=None, b_t=None, s_scale=1.0, t_scale=1.0, s_cap=None,
                                 t_cap=None, temperature=1.0):
    def logits(h, w, b, scale, cap):
        z = F.linear(h, w, b) * scale
        return (z if cap is None else cap * torch.tanh(z / cap)) / temperature

    zs, zt = logits(h_s, w_s, b_s, s_scale, s_cap), logits(h_t, w_t, b_t, t_scale, t_cap)
    per_tok = port_generalized_jsd_loss(zs, zt.detach(), beta=beta, reduction="none").sum(-1)
    valid = mask != 0
    ent = -(F.softmax(zs, -1) * F.log_softmax(zs, -1)).sum(-1)
    loss = torch.where(valid, per_tok, 0.0).sum()
    den = valid.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return loss / den, torch.where(valid, ent, 0.0).sum().detach(), valid.sum()


def trl_chunked(*args, **kwargs):
    if trl_distill is not None:
        return trl_distill._chunked_divergence_loss(*args, **kwargs)
    return port_trl_chunked(*args, **kwargs)


def port_trl_chunked(*args, **kwargs):
    """The transcription, called with trl's keyword names."""
    names = dict(student_lm_head_bias="b_s", teacher_lm_head_bias="b_t",
                 student_logit_scale="s_scale", teacher_logit_scale="t_scale",
                 student_final_logit_softcapping="s_cap",
                 teacher_final_logit_softcapping="t_cap")
    return port_chunked_divergence_loss(*args, **{names.get(k, k): v for k, v in kwargs.items()})


def _heads(dtype, B=2, K=6, Hs=8, Ht=12, V=41):
    g = torch.Generator().manual_seed(7)
    r = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype)
    student = [r(B, K, Hs, std=4.0), r(V, Hs), r(V, std=3.0)]
    teacher = [r(B, K, Ht, std=4.0), r(V, Ht), r(V, std=3.0)]
    return [x.requires_grad_(True) for x in student], teacher


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("extras", [
    {},
    dict(student_logit_scale=0.5, teacher_logit_scale=1.5, temperature=2.0,
         student_final_logit_softcapping=20.0, teacher_final_logit_softcapping=10.0),
])
@pytest.mark.parametrize("num_items", [None, 13.0])
def test_chunked_divergence_loss_matches_trl(beta, extras, num_items):
    """Against the float64 transcription (the oracle) under the low-precision rule, with
    trl's own float32 kernel as "PyTorch's error": trl accumulates in float32 throughout,
    so its float64 run is no oracle (its JSD gradient is off by ~5e-4 here, ours ~3e-6)."""
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 5] = 0
    n = None if num_items is None else torch.tensor(num_items)
    outs = {}
    for name, dtype in (("ref", torch.float64), ("trl", torch.float32),
                        ("ours", torch.float32)):
        (hs, ws, bs), (ht, wt, bt) = _heads(dtype)
        fn = {"ref": port_trl_chunked, "trl": trl_chunked,
              "ours": kdtrl.chunked_divergence_loss}[name]
        with recording() as ran:
            loss, ent, n_valid = fn(hs, ht, ws, wt, mask, beta, num_items_in_batch=n,
                                    student_lm_head_bias=bs, teacher_lm_head_bias=bt, **extras)
            loss.backward()
        outs[name] = (loss.detach(), ent, n_valid, hs.grad, ws.grad, bs.grad, ran)
    ref, low, ours = outs["ref"], outs["trl"], outs["ours"]
    assert ("fused_linear_kd_loss", "torch") in ours[6]
    assert int(ours[2]) == int(ref[2]) == 9
    ulp = torch.finfo(torch.float32).eps
    assert_lowp(ours[0], low[0], ref[0], torch.float32, slack=2 * ulp * ref[0].abs().item())
    assert_lowp(ours[1], low[1], ref[1], torch.float32, slack=2 * ulp * ref[1].abs().item())
    for a, b, r in zip(ours[3:6], low[3:6], ref[3:6]):
        assert_lowp(a, b, r, torch.float32, measure=rel_err, slack=1e-5)


@requires_trl
def test_chunked_port_is_trls_formula():
    """The transcription (the oracle above) computes what trl's chunked kernel does."""
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 2:] = 0
    (hs, ws, bs), (ht, wt, bt) = _heads(torch.float64)
    kw = dict(student_lm_head_bias=bs, teacher_lm_head_bias=bt, temperature=1.3,
              student_final_logit_softcapping=15.0, teacher_logit_scale=0.7)
    for beta in (0.0, 0.6, 1.0):
        a = trl_distill._chunked_divergence_loss(hs, ht, ws, wt, mask, beta, **kw)
        b = port_trl_chunked(hs, ht, ws, wt, mask, beta, **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.double(), y.double(), rtol=1e-5, atol=1e-6)


def test_chunked_divergence_loss_without_entropy_and_all_masked():
    (hs, ws, bs), (ht, wt, bt) = _heads(torch.float32)
    mask = torch.zeros(2, 6, dtype=torch.long)
    loss, ent, n = kdtrl.chunked_divergence_loss(hs, ht, ws, wt, mask, 0.5, entropy=False)
    loss.backward()
    assert loss.item() == 0.0 and int(n) == 0 and math.isnan(ent.item())
    assert torch.count_nonzero(hs.grad) == 0 and torch.count_nonzero(ws.grad) == 0


# --- plugging into the trainers -----------------------------------------------------------


def test_patch_gkd_trainer_mechanism():
    class Trainer:  # a stand-in with GKDTrainer's method (trl not needed)
        generalized_jsd_loss = staticmethod(port_generalized_jsd_loss)

        def loss(self, s, t, labels):
            return self.generalized_jsd_loss(student_logits=s, teacher_logits=t,
                                             labels=labels, beta=0.3)

    s, t, labels = _inputs()
    one, other = Trainer(), Trainer()
    assert kdtrl.patch_gkd_trainer(one) is one
    with recording() as ran:
        a = one.loss(s, t, labels)
    assert ran and Trainer.generalized_jsd_loss is port_generalized_jsd_loss
    with recording() as ran:
        b = other.loss(s, t, labels)  # the class and its other instances are untouched
    assert not ran
    torch.testing.assert_close(a, b.float(), rtol=2e-6, atol=1e-6)
    kdtrl.patch_gkd_trainer(Trainer)
    with recording() as ran:
        other.loss(s, t, labels)
    assert ran

    class Gold:  # another trainer's loss with other arguments: refused
        @staticmethod
        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5,
                                 temperature=1.0, reduction="batchmean",
                                 logits_are_probs=False, num_items_in_batch=None):
            raise AssertionError

    with pytest.raises(TypeError, match="logits_are_probs"):
        kdtrl.patch_gkd_trainer(Gold)
    with pytest.raises(TypeError, match="generalized_jsd_loss"):
        kdtrl.patch_gkd_trainer(object())


def _tiny_gkd_setup(tmp_path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "user", "assistant", ":"] + [f"w{i}" for i in range(40)]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> "
                         "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")

    def model(hidden, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=64, initializer_range=0.5, pad_token_id=0,
            eos_token_id=1, bos_token_id=2))

    chat = lambda u, a: [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    data = Dataset.from_dict({"messages": [chat("w1 w2 w3", "w4 w5 w6 w7"),
                                           chat("w8 w9", "w10 w11 w12")] * 2})
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                     lmbda=0.0, beta=0.3, learning_rate=1e-2, report_to="none",
                     logging_steps=1, use_cpu=True, save_strategy="no", max_length=32,
                     seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return lambda cls: cls(model=model(16, 0), teacher_model=model(24, 1), args=args,
                           train_dataset=data, processing_class=tok)


@requires_trl
def test_kd_gkd_trainer_trains_like_gkd_trainer(tmp_path):
    """Two optimizer steps of trl's GKDTrainer and of KDGKDTrainer from the same start:
    same logged losses and parameters (to float32 rounding); kdkernels' kd_loss ran."""
    make = _tiny_gkd_setup(tmp_path)
    runs = {}
    for cls in (GKDTrainer, kdtrl.KDGKDTrainer):
        trainer = make(cls)
        with recording() as ran:
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[cls] = (losses, dict(trainer.model.named_parameters()), ran)
    (l_trl, p_trl, ran_trl), (l_kd, p_kd, ran_kd) = runs.values()
    assert not ran_trl and ("kd_loss", "torch") in ran_kd
    assert len(l_kd) == len(l_trl) == 2 and min(l_trl) > 1e-2
    torch.testing.assert_close(torch.tensor(l_kd), torch.tensor(l_trl), rtol=1e-4, atol=1e-6)
    for name, p in p_trl.items():
        torch.testing.assert_close(p_kd[name], p, rtol=1e-4, atol=1e-5)
    assert issubclass(kdtrl.KDGKDTrainer, GKDTrainer)


@requires_trl
def test_patch_distillation_trainer_swaps_the_module_function(monkeypatch):
    original = trl_distill._chunked_divergence_loss
    monkeypatch.setattr(trl_distill, "_chunked_divergence_loss", original)  # restored after
    assert kdtrl.patch_distillation_trainer(entropy=False) is original
    new = trl_distill._chunked_divergence_loss
    assert new.func is kdtrl.chunked_divergence_loss and new.keywords == {"entropy": False}

    # KDDistillationTrainer swaps it only while its own _compute_loss runs.
    monkeypatch.setattr(trl_distill, "_chunked_divergence_loss", original)
    seen = []
    monkeypatch.setattr(trl_distill.DistillationTrainer, "_compute_loss",
                        lambda self: seen.append(trl_distill._chunked_divergence_loss))
    trainer = object.__new__(kdtrl.KDDistillationTrainer)
    trainer._compute_loss()
    assert seen[0].func is kdtrl.chunked_divergence_loss and seen[0].keywords["entropy"]
    assert trl_distill._chunked_divergence_loss is original
    assert issubclass(kdtrl.KDDistillationTrainer, trl_distill.DistillationTrainer)


def test_module_imports_without_trl_and_names_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None\n"
            "import kdkernels.integrations.trl as m\n"
            "assert callable(m.generalized_jsd_loss)\n"
            "try:\n    m.KDGKDTrainer\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install trl" in out.stdout
