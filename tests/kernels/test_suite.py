"""The property suite behind ``lmspec test-kernels``: rows for every kernel, bf16 included, and its table."""

from __future__ import annotations

import io

from rich.console import Console

from kernels.constants import MOE_SIGMOID, NORM, SMALL_GLOBAL, SMALL_W5
from lmspec.compiler.variants import DecodeAttentionVariant, LMHeadCEVariant, RoPEVariant, SwiGLUVariant
from lmspec.testing import KernelRow, print_kernel_table, run_kernel_suite

SMALL = (
    NORM,
    SwiGLUVariant(),
    RoPEVariant(rope_dim=16, qk_head_dim=40),
    SMALL_W5,
    SMALL_GLOBAL,
    DecodeAttentionVariant(**SMALL_W5.constants()),
    DecodeAttentionVariant(**SMALL_GLOBAL.constants()),
    MOE_SIGMOID,
    LMHeadCEVariant(vocab_size=300),
)


def test_suite_passes_every_kernel_in_bfloat16():
    rows = run_kernel_suite(SMALL, 4, dtypes=("bfloat16",))
    kernels = {r.kernel for r in rows}
    assert {"lmspec_attn_sliding_sink_w5_qk40_v24_vs0p5", "lmspec_decode_global_qk20_v12"} <= kernels
    assert {
        "lmspec_moe_sigmoid_e8_k3_route",
        "lmspec_moe_sigmoid_e8_k3_experts",
        "lmspec_lm_head_ce_v300",
    } <= kernels
    failed = [f"{r.kernel}: {r.detail}" for r in rows if r.verdict != "pass"]
    assert not failed, "\n".join(failed)
    assert all(r.cases == 4 and r.tolerance == 1e-2 and r.worst_error > 0 for r in rows)


def test_table_shows_failures_with_their_case():
    rows = [
        KernelRow("lmspec_swiglu", 5, 1e-7, 1e-4, "pass"),
        KernelRow("lmspec_attn_x", 2, float("inf"), 1e-4, "FAIL", "AttentionCase(seq=3)\nout: NaN"),
    ]
    out = io.StringIO()
    print_kernel_table(rows, console=Console(file=out, width=120))
    text = out.getvalue()
    assert "lmspec_swiglu" in text and "FAIL" in text and "AttentionCase(seq=3)" in text
