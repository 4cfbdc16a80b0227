"""The output head of a causal LM, as the fused losses see it: what the model does to the
head's output (`HeadSpec`, read from its config), the forward pre-hook that hands over
the head's input, and the check of the spec against the model's own logits."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._core.validate import check_int, check_number

# What causal LMs of transformers do to the head's output, by config attribute:
# (model_type prefix, attribute, "mul" | "div"). Searched in transformers 5.x modeling
# code; the softcap keys are Gemma 2/3/3n/4, VaultGemma, nanochat (final_logit_softcapping),
# RecurrentGemma (logits_soft_cap) and xLSTM (output_logit_soft_cap). Transforms of the
# head's *input* (MiniCPM3's h / logits_scaling, ...) need nothing: the hook sees that input.
_SOFTCAP_KEYS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_SCALE_RULES = (
    ("cohere", "logit_scale", "mul"),            # Cohere, Cohere2: logits * logit_scale
    ("granite", "logits_scaling", "div"),        # Granite family: logits / logits_scaling
    ("hyperclovax", "logits_scaling", "mul"),    # HyperCLOVA X: logits * logits_scaling
    ("falcon_h1", "lm_head_multiplier", "mul"),  # Falcon-H1
    ("muse_", "output_multiplier", "mul"),       # multiplied before its softcap
)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


@dataclass(frozen=True)
class HeadSpec:
    """What a causal LM does to its head's output: logits = f(h Wᵀ + b)[..., :vocab_size]
    with f(x) = c·tanh(m·x/c) for a softcap c, else m·x (m = logit_scale), the form
    `fused_linear_kd_loss` takes. `vocab_size=None` keeps every row of W."""

    softcap: float | None = None
    logit_scale: float = 1.0
    vocab_size: int | None = None

    def __post_init__(self):
        if self.softcap is not None:
            check_number("softcap", self.softcap, lo=0.0, lo_open=True)
        check_number("logit_scale", self.logit_scale)
        if self.vocab_size is not None:
            check_int("vocab_size", self.vocab_size, lo=1)

    @classmethod
    def from_config(cls, config) -> HeadSpec:
        """The spec a transformers config implies (its text config for multimodal ones)."""
        c = _text_config(config)
        mt = str(getattr(c, "model_type", "") or "")
        cap = next((getattr(c, k) for k in _SOFTCAP_KEYS if getattr(c, k, None) is not None),
                   None)
        scale = 1.0
        for prefix, attr, how in _SCALE_RULES:
            val = getattr(c, attr, None)
            if mt.startswith(prefix) and val is not None:
                scale = float(val) if how == "mul" else 1.0 / float(val)
                break
        vocab = getattr(c, "unpadded_vocab_size", None)
        return cls(float(cap) if cap is not None else None, scale,
                   int(vocab) if vocab is not None else None)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) (x: the head's output, already cut to vocab_size)."""
        if self.softcap is not None:
            return torch.tanh(x * (self.logit_scale / self.softcap)) * self.softcap
        return x * self.logit_scale if self.logit_scale != 1.0 else x


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed wrappers (torch.compile's and PEFT's
    wrappers forward attribute access themselves)."""
    m = model
    while not hasattr(m, "get_output_embeddings") and isinstance(getattr(m, "module", None),
                                                                    nn.Module):
        m = m.module
    return m


def head_of(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    inner = _unwrap(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{name} ({type(inner).__name__}) has no output head with a weight "
            "(get_output_embeddings() returned "
            f"{type(head).__name__ if head is not None else None}); the fused losses need a "
            "causal LM's lm_head. Use fused=False to distil from its logits"
        )
    return inner, head


def head_weights(head: nn.Module, h: torch.Tensor, spec: HeadSpec):
    """(h, W, b) as the head's matmul sees them: W cut to spec.vocab_size; under autocast
    all three in the autocast dtype, as nn.Linear would compute."""
    w, b = head.weight, getattr(head, "bias", None)
    if spec.vocab_size is not None and spec.vocab_size < w.shape[0]:
        w = w[: spec.vocab_size]
        b = b[: spec.vocab_size] if b is not None else None
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h, w = h.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
    return h, w, b


def run_head_hooked(model: nn.Module, head: nn.Module, fn, inputs: dict, name: str,
                     skip_logits: bool = True):
    """Run model(**inputs) with a forward pre-hook on `head` that calls fn(h, head) with the
    head's input h; with skip_logits the head then gets h[..., :0, :] (no logits are
    computed). Returns (fn's result, the model's output)."""
    box = []

    def pre_hook(module, args, kwargs):
        if box:
            raise RuntimeError(
                f"{name} called its output head twice in one forward; the fused path needs "
                "a model that projects all hidden states once (use fused=False)"
            )
        if not args:
            raise RuntimeError(f"{name}'s output head was called without a positional input")
        h = args[0]
        box.append(fn(h, module))
        if skip_logits:
            return (h[..., :0, :],) + tuple(args[1:]), kwargs
        return None

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    if not box:
        raise ValueError(
            f"{name}'s forward never called its output head ({type(head).__name__} from "
            "get_output_embeddings()); the fused path cannot see its hidden states "
            "(use fused=False)"
        )
    return box[0], out


def with_no_cache(model: nn.Module, inputs: dict) -> dict:
    """inputs plus use_cache=False (no KV cache in training) when the forward takes it."""
    if "use_cache" in inputs:
        return inputs
    params = inspect.signature(_unwrap(model).forward).parameters
    if "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(inputs, use_cache=False)
    return inputs


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


# Models whose head transform has been checked against their own logits: model -> spec.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHECK_TOKENS = 8


def _rtol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 4e-2


def check_head(model: nn.Module, spec: HeadSpec, input_ids: torch.Tensor, name: str) -> None:
    """Raise ValueError unless f(h Wᵀ + b) (`spec`) reproduces the model's own logits on the
    first row's first few tokens. One extra forward without gradients, in eval mode (the
    mode is restored), once per model and spec."""
    inner, head = head_of(model, name)
    if _VERIFIED.get(inner) == spec:
        return
    ids = input_ids.reshape(-1, input_ids.shape[-1])[:1, :_CHECK_TOKENS]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            def mine(h, module):
                hh, w, b = head_weights(module, h, spec)
                return spec.apply(F.linear(hh, w, b).float()), hh.dtype

            (ours, mm_dtype), out = run_head_hooked(
                model, head, mine, with_no_cache(model, {"input_ids": ids}), name,
                skip_logits=False)
            theirs = logits_of(out)
    finally:
        model.train(was_training)
    # the model may round its transform in its logits' dtype (bf16 under autocast)
    rtol = max(_rtol(mm_dtype), _rtol(theirs.dtype))
    theirs = theirs.float()
    scale = max(1.0, float(theirs.abs().max())) if theirs.numel() else 1.0
    ok = ours.shape == theirs.shape and bool(((ours - theirs).abs() <= rtol * scale).all())
    if not ok:
        err = (float((ours - theirs).abs().max()) if ours.shape == theirs.shape
               else f"shapes {tuple(ours.shape)} vs {tuple(theirs.shape)}")
        mt = getattr(_text_config(inner.config), "model_type", "?")
        raise ValueError(
            f"{name} ({type(inner).__name__}, model_type {mt!r}): the head transform {spec} "
            f"does not reproduce the model's own logits (max |Δ| {err} at logit scale "
            f"{scale:.3g}); its forward does something to the logits that the config rule "
            "does not know. Pass student_head= / teacher_head= HeadSpec(softcap=..., "
            "logit_scale=..., vocab_size=...) describing it, or fused=False"
        )
    _VERIFIED[inner] = spec
