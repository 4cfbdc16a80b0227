"""Who computes each case: our backends, eager PyTorch, torch.compile, and peers.

Every provider is looked up lazily and guarded: an op of ours that has not landed, a
peer library that is not installed, or a backend that cannot run on this device raises
`Unavailable`, and the case is reported as skipped with the reason. Nothing here
imports an optional package at module import time.

Provider names (the `--providers` option matches them with shell patterns):
    kdkernels[torch] kdkernels[triton] kdkernels[cuda]   our backends
    eager          naive PyTorch (kdkernels.bench.naive)
    compile        torch.compile of the eager code
    liger          Liger-Kernel's KL / JSD / TVD / fused linear JSD (GPU only)
    liger-chunked  Liger-Kernel's chunked distillation loss (LigerFusedLinearJSDLoss)
    trl-formula    TRL GKD's generalized_jsd_loss (the installed trl when present,
                   else the same formula transcribed in kdkernels.bench.naive)
    pot            POT's log-domain Sinkhorn (ot.bregman.sinkhorn_log / ot.sinkhorn2)
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

OURS_PREFIX = "kdkernels"

# Where each public op lives (top level first: the lead exports them there).
_OP_HOMES = {
    "kd_loss": ("kdkernels", "kdkernels.kd"),
    "fused_linear_kd_loss": ("kdkernels", "kdkernels.fused_linear"),
    "plackett_luce_loss": ("kdkernels", "kdkernels.pld"),
    "sinkhorn": ("kdkernels", "kdkernels.sinkhorn"),
    "sinkhorn_loss": ("kdkernels", "kdkernels.sinkhorn"),
    "topk_kd_loss": ("kdkernels", "kdkernels.topk"),
    "graph_on_logits_loss": ("kdkernels", "kdkernels.graph", "kdkernels.topk"),
}


class Unavailable(Exception):
    """This provider cannot run this case here; the message says why."""


def ours(name: str):
    """The public function `name` of kdkernels, or Unavailable if it has not landed."""
    errors = []
    for mod_name in _OP_HOMES.get(name, ("kdkernels",)):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:  # a half-written sibling module must not break the suite
            errors.append(f"{mod_name}: {e}")
            continue
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise Unavailable(f"kdkernels.{name} is not available" +
                      (f" ({'; '.join(errors)})" if errors else ""))


def our_backends(device: torch.device) -> list[str]:
    """Backends of ours worth timing on `device` (an op that lacks one is skipped later)."""
    if device.type != "cuda":
        return ["torch"]
    from .. import _backend

    out = []
    if _backend._triton_reason(device) is None:
        out.append("triton")
    try:
        if _backend._cuda_reason(device) is None:
            out.append("cuda")
    except Exception:  # the extension loader itself failing means: no cuda backend
        pass
    out.append("torch")
    return out


def provider_name(backend: str) -> str:
    return f"{OURS_PREFIX}[{backend}]"


def _need_module(name: str, why: str):
    if importlib.util.find_spec(name) is None:
        raise Unavailable(f"{why}: `{name}` is not installed")
    try:
        return importlib.import_module(name)
    except Exception as e:  # broken install of a peer: skip it, say why
        raise Unavailable(f"{why}: importing `{name}` failed: {e}") from e


def liger_attr(device: torch.device, module: str, name: str):
    """A Liger-Kernel class, or Unavailable (Liger's Triton kernels need a GPU)."""
    if device.type != "cuda":
        raise Unavailable("Liger-Kernel runs on CUDA tensors only")
    mod = _need_module(module, "Liger-Kernel")
    cls = getattr(mod, name, None)
    if cls is None:
        raise Unavailable(f"this Liger-Kernel has no {module}.{name}")
    return cls


def trl_generalized_jsd():
    """TRL's GKDTrainer.generalized_jsd_loss when trl is installed, else None."""
    if importlib.util.find_spec("trl") is None:
        return None
    try:
        from trl import GKDTrainer
    except Exception:
        return None
    return getattr(GKDTrainer, "generalized_jsd_loss", None)


def pot():
    return _need_module("ot", "POT")


_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn), one compiled callable per Python function (shared by cases)."""
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    if fn not in _COMPILED:
        import torch._dynamo as dynamo

        # One compiled graph per (shape, dtype, keyword) combination; keep them all
        # instead of silently falling back to eager after the default 8.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(
                dynamo.config.accumulated_cache_size_limit, 4096)
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def versions() -> dict[str, str]:
    """Versions of everything that can appear in a run (absent peers are left out)."""
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import kdkernels

        out["kdkernels"] = kdkernels.__version__
    except Exception:
        pass
    for mod in ("triton", "liger_kernel", "trl", "ot"):
        if importlib.util.find_spec(mod) is None:
            continue
        try:
            from importlib.metadata import version

            dist = {"ot": "pot", "liger_kernel": "liger-kernel"}.get(mod, mod)
            out[dist] = version(dist)
        except Exception:
            out[mod] = "?"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
