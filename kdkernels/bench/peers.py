"""Peer libraries as providers: Liger-Kernel, TRL's GKD formula, POT.

Each is looked up when its case runs; a peer that is not installed (or cannot run on
this device) raises `Unavailable`, and its cases are reported as not measured.
"""

from __future__ import annotations

import importlib.util  # also binds importlib.import_module

import torch
import torch.nn.functional as F

from . import naive
from .providers import Unavailable


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


def liger_kd(device, div):
    """Liger's losses take log-probs (KL, JSD) or probs (TVD): the softmax is timed too."""
    if div == "forward_kl":
        cls = liger_attr(device, "liger_kernel.transformers", "LigerKLDIVLoss")
        m = cls(reduction="batchmean", log_target=True)
        return lambda x: m(F.log_softmax(x["s"], -1), F.log_softmax(x["t"], -1))
    if div == "jsd":
        m = liger_attr(device, "liger_kernel.transformers", "LigerJSD")(beta=0.5)
        return lambda x: m(F.log_softmax(x["s"], -1), F.log_softmax(x["t"], -1))
    if div == "tvd":
        m = liger_attr(device, "liger_kernel.transformers", "LigerTVDLoss")(reduction="batchmean")
        return lambda x: m(torch.softmax(x["s"], -1), torch.softmax(x["t"], -1))
    raise Unavailable(f"Liger-Kernel has no {div}")


def trl_jsd():
    """TRL's generalized JSD (beta 0.5), or the same formula transcribed."""
    real = trl_generalized_jsd()
    if real is not None:
        return lambda x: real(x["s"], x["t"], beta=0.5, temperature=1.0, reduction="batchmean")
    return lambda x: naive.trl_jsd_formula(x["s"], x["t"], beta=0.5)


def liger_fused_jsd(device):
    cls = liger_attr(device, "liger_kernel.transformers", "LigerFusedLinearJSD")
    m = cls(jsd_beta=0.5, temperature=1.0)
    return lambda x: m(x["hs"], x["ws"], x["ht"], x["wt"])


def liger_chunked_jsd(device):
    cls = liger_attr(device, "liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
    m = cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)

    def run(x):
        args = (x["hs"], x["ws"], x["ht"], x["wt"], x["y"])
        try:
            return m(*args, None, None)
        except TypeError:  # releases without bias arguments
            return m(*args)

    return run


def _uniform(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((b,), 1.0 / b, dtype=like.dtype, device=like.device)


def pot_sinkhorn(eps: float):
    """POT's log-domain solver on the cost matrix x["C"], uniform marginals."""
    ot = pot()

    def run(x):
        c = x["C"]
        a = _uniform(c.shape[-1], c)
        return ot.bregman.sinkhorn_log(a, a, c, eps, numItermax=x["iters"], stopThr=0.0,
                                       warn=False)

    return run


def pot_sinkhorn_loss(eps: float):
    """POT's Sinkhorn distance between the batch's softmaxes, L1 cost (as sinkhorn_loss)."""
    ot = pot()

    def run(x):
        cost = torch.cdist(torch.softmax(x["s"], -1), torch.softmax(x["t"], -1), p=1)
        a = _uniform(cost.shape[-1], cost)
        return ot.sinkhorn2(a, a, cost, eps, method="sinkhorn_log", numItermax=x["iters"],
                            stopThr=0.0)

    return run
