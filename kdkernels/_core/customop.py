"""Registering launchers as `torch.library` custom ops, each with its fake, in one step.

A custom op with a fake (meta) implementation lets `torch.compile(fullgraph=True)` trace
a public loss without graph breaks: the compiler sees one opaque call with known output
shapes, never the data-dependent loops and kernel launches inside.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NAMESPACE = "kdkernels"


def _writes_outputs_only(*args, **kwargs) -> None:
    return None


def custom_op(name: str, *, mutates: tuple[str, ...] = (), fake: Callable | None = None):
    """Decorator: register `fn` as `kdkernels::<name>`, with fake implementation `fake`.

    Out-variant ops (they write into the arguments named in `mutates` and return None)
    need no `fake`; ops that return new tensors pass one that allocates their shapes.
    """

    def register(fn):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(fn)
        if fake is None and not mutates:
            raise ValueError(f"{name}: an op that returns tensors needs a fake implementation")
        op.register_fake(fake if fake is not None else _writes_outputs_only)
        return op

    return register
