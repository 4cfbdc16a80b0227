"""The vocab-parallel benchmark group at tiny sizes (N=8, V=64 and 256, 2 gloo ranks):
every case passes its check, and the bytes per step are the documented O(N) counts
(docs/vocab_parallel.md): 14 float64 per row for kd_loss with a hard label at τ ≠ 1,
8(k + 3) bytes per row for the bucket tail, and the fused loss adds its hidden-gradient
all-reduce (H float32 per row). The CLI writes the rows into results.csv / results.md,
each labelled with the backend recorded while it ran (torch on gloo). The NCCL case
list (every op on torch, triton and cuda) and the labelling rule are checked without
GPUs."""

from __future__ import annotations

import csv
import re

import pytest

from kdkernels.bench import vocabpar

N, H, K = 8, 16, 16
EXPECTED = {  # bytes per rank per forward+backward step
    "kd.forward_kl": N * 14 * 8,
    "kd.jsd": N * 14 * 8,
    "topk_kd.bucket": N * 8 * (K + 3),
    "fused_linear.forward_kl": N * (14 * 8 + 4 * H),
}


@pytest.fixture(scope="module")
def tiny_cli_run(tmp_path_factory):
    from kdkernels.__main__ import main

    out = tmp_path_factory.mktemp("vp")
    rc = main(["bench", "--ops", "vocab-parallel", "--shapes", "tiny", "--out", str(out),
               "--quiet", "--no-plots", "--device", "cpu"])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["group"] == "vocab-parallel"]
    return rows, (out / "results.md").read_text()


def test_tiny_cases_are_the_documented_ones():
    cases = vocabpar.select(None, tiny=True, nccl=False)
    assert [c.op for c in cases] == list(EXPECTED)
    assert {c.backend for c in cases} == {"torch"}  # gloo: torch only
    assert all(c.vocabs == (64, 256) and c.shape["N"] == N for c in cases)
    assert [c.op for c in vocabpar.select(["kd"], tiny=True, nccl=False)] == [
        "kd.forward_kl", "kd.jsd"]


def test_nccl_runs_every_backend():
    """With 2 GPUs every op (the fused loss too) runs on torch, triton and cuda."""
    cases = vocabpar.select(None, tiny=True, nccl=True)
    assert [(c.op, c.backend) for c in cases] == [
        (op, be) for op in EXPECTED for be in ("torch", "triton", "cuda")]
    assert len({c.id for c in cases}) == len(cases)
    assert [c.id for c in vocabpar.select(["fused_linear"], tiny=True, nccl=True)] == [
        "fused_linear.forward_kl", "fused_linear.forward_kl[triton]",
        "fused_linear.forward_kl[cuda]"]


def test_rows_are_labelled_with_what_ran():
    case = vocabpar.select(["kd.jsd"], tiny=True, nccl=True)[1]
    assert case.backend == "triton"
    assert vocabpar.backends_ran(case, [("scale_rows", "triton")]) == {"triton"}
    for recorded, why in (([], "no kdkernels dispatch was recorded"),
                          ([("scale_rows", "triton"), ("kd_loss", "torch")],
                           "ran torch (kd_loss), not triton")):
        with pytest.raises(RuntimeError, match=re.escape(why)):
            vocabpar.backends_ran(case, recorded)
    res = vocabpar.VPResult(case=case, backend="nccl", ran=["triton"])
    assert res.provider == "kdkernels[triton] nccl×2"
    # a row that did not run names the backend asked for (its status says it did not run)
    res = vocabpar.VPResult(case=case, backend="nccl", status="error", note="boom")
    assert res.provider == "kdkernels[triton] nccl×2"


def test_bytes_per_step_are_independent_of_the_vocabulary(tiny_cli_run):
    rows, _ = tiny_cli_run
    assert not [r for r in rows if r["metric"] == "status"], rows
    got = {(r["op"], r["shape"]): float(r["value"]) for r in rows
           if r["metric"] == "bytes_per_step"}
    for op, want in EXPECTED.items():
        for v in (64, 256):
            extra = {"topk_kd.bucket": f",k={K}", "fused_linear.forward_kl": f",H={H}"}
            assert got[(op, f"N={N},V={v}" + extra.get(op, ""))] == want, (op, v)
    # every row labelled with the backend recorded in the ranks' steps
    assert {r["provider"] for r in rows} == {"kdkernels[torch] gloo×2"}, rows
    passes = {r["op"]: float(r["value"]) for r in rows if r["metric"] == "pass"}
    ratios = {r["op"]: float(r["value"]) for r in rows if r["metric"] == "bytes_ratio"}
    assert passes == {op: 1.0 for op in EXPECTED}
    assert ratios == {op: 1.0 for op in EXPECTED}
    times = [float(r["value"]) for r in rows if r["metric"].startswith("time_rank")]
    assert len(times) == len(EXPECTED) * 2 * 2 and all(t > 0 for t in times)


def test_markdown_section(tiny_cli_run):
    _, md = tiny_cli_run
    assert "## vocab-parallel: bytes communicated per step" in md
    section = md.split("## vocab-parallel: bytes communicated per step")[1]
    assert section.count("| PASS |") == len(EXPECTED)
    assert section.count("| kdkernels[torch] gloo×2 |") == len(EXPECTED)
    assert "**FAIL**" not in section


def test_a_failing_check_is_reported():
    case = vocabpar.cases(tiny=True)[0]
    res = vocabpar.VPResult(case=case, bytes={"64": [896, 896], "256": [896, 904]})
    assert res.passed is False
    res = vocabpar.VPResult(case=case, bytes={"64": [0, 0], "256": [0, 0]})
    assert res.passed is False
    res = vocabpar.VPResult(case=case, bytes={"64": [896, 896], "256": [896, 896]})
    assert res.passed is True and res.ratio == 1.0
