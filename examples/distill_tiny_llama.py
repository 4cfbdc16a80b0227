"""Distil a tiny Llama teacher into a smaller Llama student on the CPU, three ways.

    python examples/distill_tiny_llama.py --steps 200 --vocab 32000 --seq 64 --batch 4

Both models are built from a `LlamaConfig` with random weights (nothing is downloaded):
the teacher has hidden size 128, the student 64, two layers each, a 32000-token
vocabulary by default. The teacher's LM head is scaled up so that its next-token
distributions are peaked rather than nearly uniform. The data are random token ids.

The same student (same initial weights) is trained on the same batches with AdamW and
the forward KL KL(p_teacher ‖ q_student) over every position that has a next token, by
three paths:

- eager:          both models' logits, then F.log_softmax / exp / sum written out in
                  plain PyTorch (autograd differentiates it);
- kd_loss:        both models' logits, then `kdkernels.kd_loss` (through
                  `KDForCausalLM(fused=False)`);
- fused:          `kdkernels.fused_linear_kd_loss` on the hidden states and the LM heads
                  (through `KDForCausalLM(fused=True)`): neither model's forward makes
                  logits; the loss computes them a chunk of token rows at a time.

It prints each path's time, its peak memory, and the largest relative difference
between the paths' loss curves (the kernels are exact: the curves agree to float32
rounding).

Peak memory: PyTorch's CPU allocations are invisible to `tracemalloc`, so each path runs
in a fresh Python process that reads the kernel's own counters in /proc/self/status: the
resident set (VmRSS) once the models, the optimizer and the data exist (the baseline),
then the peak resident set (VmHWM, reset at the baseline through /proc/self/clear_refs)
after training. "peak Δ" = peak − baseline: everything training allocated at its
highest (activations, logits, their gradients, AdamW's state, allocator caching), the
same way for every path (the student's gradients and AdamW's two moments alone are
about 50 MiB here). The fused loss works on chunks of token rows sized from a 256 MiB
budget, so a batch of a few hundred tokens is one chunk and its logits exist for that
chunk; `--chunk-size` bounds them (the saving grows with the number of tokens). Where
the reset is refused (non-Linux, some containers) the peak since process start is used
and the table says so. `--no-subprocess` runs the paths in this process (no memory
column).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

PATHS = ("eager", "kd_loss", "fused")
_MARK = "DISTILL_RESULT "


# -- models and data ---------------------------------------------------------------------


def build_models(vocab: int, seed: int):
    """(teacher, student), float32, random weights drawn from `seed` (the same in every
    process). The teacher is frozen and in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(hidden: int, heads: int):
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=2, num_attention_heads=heads,
                           num_key_value_heads=heads // 2, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)

    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(config(128, 4)).float()
    with torch.no_grad():  # peaked teacher distributions (random init gives ~uniform ones)
        teacher.lm_head.weight.mul_(100.0)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(seed + 1)
    student = LlamaForCausalLM(config(64, 4)).float()
    return teacher, student


def make_batches(steps: int, batch: int, seq: int, vocab: int, seed: int):
    """Random token ids, one [batch, seq] tensor per step; the last quarter of the first
    row is padding (attention_mask 0), so masking is exercised too."""
    g = torch.Generator().manual_seed(seed + 2)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq - seq // 4:] = 0
        out.append((ids, mask))
    return out


# -- the three losses --------------------------------------------------------------------


def eager_forward_kl(student, teacher, ids, mask):
    """Forward KL written out in plain PyTorch, float32, on both models' full logits.
    Position i (a token) predicts token i+1 (a token); the mean is over those positions."""
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask).logits
    s = student(input_ids=ids, attention_mask=mask).logits
    log_p = F.log_softmax(t, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                     # [B, T]
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:, :-1] = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    return torch.where(valid, kl, 0.0).sum() / valid.sum()


def make_loss(path: str, chunk_size: int | None = None):
    if path == "eager":
        return eager_forward_kl
    from kdkernels.integrations.transformers import KDForCausalLM

    kw = {"chunk_size": chunk_size} if path == "fused" and chunk_size else {}
    kd = KDForCausalLM(divergence="forward_kl", fused=(path == "fused"), **kw)
    return lambda student, teacher, ids, mask: kd(student, teacher, input_ids=ids,
                                                  attention_mask=mask)


# -- one path ----------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_path(path: str, steps: int, vocab: int, seq: int, batch: int, lr: float = 1e-3,
             seed: int = 0, measure_memory: bool = False,
             chunk_size: int | None = None) -> dict:
    """Train the student `steps` AdamW steps by `path`; the loss of every step (before its
    update), the training time and, with measure_memory, the peak memory (module doc)."""
    teacher, student = build_models(vocab, seed)
    data = make_batches(steps, batch, seq, vocab, seed)
    loss_fn = make_loss(path, chunk_size)
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    gc.collect()
    base = _status_kib("VmRSS") if measure_memory else None
    reset = _reset_peak() if measure_memory else False
    losses = []
    t0 = time.perf_counter()
    for ids, mask in data:
        loss = loss_fn(student, teacher, ids, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        del loss
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM") if measure_memory else None
    out = {"path": path, "losses": losses, "seconds": seconds}
    if base is not None and peak is not None:
        out.update(peak_delta_mib=(peak - base) / 1024.0, baseline_mib=base / 1024.0,
                   peak_reset=reset)
    return out


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """max_step |a − b| / |b|."""
    return max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b))


# -- the driver --------------------------------------------------------------------------


def _child(args) -> None:
    res = run_path(args.child, args.steps, args.vocab, args.seq, args.batch, args.lr,
                   args.seed, measure_memory=True, chunk_size=args.chunk_size)
    print(_MARK + json.dumps(res), flush=True)


def _run_in_subprocess(path: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path,
           "--steps", str(args.steps), "--vocab", str(args.vocab), "--seq", str(args.seq),
           "--batch", str(args.batch), "--lr", str(args.lr), "--seed", str(args.seed)]
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    raise RuntimeError(f"path {path} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="token rows per chunk of the fused loss (default: automatic, from "
                        "a 256 MiB budget)")
    p.add_argument("--no-subprocess", action="store_true",
                   help="run the paths in this process (no peak-memory column)")
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return {}
    print(f"teacher hidden 128, student hidden 64, 2 layers each, vocab {args.vocab}; "
          f"{args.steps} AdamW steps of batch {args.batch} × seq {args.seq}, float32, "
          f"{torch.get_num_threads()} threads; one model's float32 logits: "
          f"{args.batch * args.seq * args.vocab * 4 / 2**20:.1f} MiB")
    results = {}
    for path in PATHS:
        if args.no_subprocess:
            results[path] = run_path(path, args.steps, args.vocab, args.seq, args.batch,
                                     args.lr, args.seed, chunk_size=args.chunk_size)
        else:
            results[path] = _run_in_subprocess(path, args)
    print(f"{'path':<8} {'time (s)':>9} {'ms/step':>8} {'peak Δ (MiB)':>13} "
          f"{'first loss':>11} {'last loss':>11}")
    for path, r in results.items():
        mem = r.get("peak_delta_mib")
        mem_s = "-" if mem is None else f"{mem:.1f}" + ("" if r.get("peak_reset") else "*")
        print(f"{path:<8} {r['seconds']:>9.2f} {1e3 * r['seconds'] / args.steps:>8.1f} "
              f"{mem_s:>13} {r['losses'][0]:>11.6f} {r['losses'][-1]:>11.6f}")
    if any(r.get("peak_reset") is False for r in results.values()):
        print("* peak since process start (the peak counter could not be reset)")
    diffs = {}
    for i, a in enumerate(PATHS):
        for b in PATHS[i + 1:]:
            diffs[f"{a} vs {b}"] = max_rel_diff(results[a]["losses"], results[b]["losses"])
    print("max relative |Δ| between the loss curves over "
          f"{args.steps} steps: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return {"results": results, "diffs": diffs}


if __name__ == "__main__":
    main()
