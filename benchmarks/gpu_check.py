"""GPU check of every rendered kernel at full MiMo-V2-Flash dims: correctness vs the reference, and speed.

The kernels are the variants of ``examples/mimo_v2_flash.yaml``'s IR (``kernel_variants``), with the head
counts of the attention nodes each one implements.

Usage: ``python benchmarks/gpu_check.py [--out gpu_check.json] [--seq 4096] [--budget-s 270]``

For each kernel: relative error of the forward and of every gradient against the plain-PyTorch reference
(run in float32 on the same bf16 inputs), checked against the bf16 tolerance of ``lmspec.testing``; then
the median time of kernel and reference (forward, and forward+backward where there is one). Attention is
also timed against SDPA with a boolean sliding-window mask and FlexAttention with a sliding-window block
mask (neither supports a sink, so they run without one: a speed yardstick, not a drop-in). Prints a table,
writes JSON, and stops starting new checks when the time budget (default 270 s, well under 5 min) is spent.
On a machine without CUDA it prints why it cannot run and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The kernels checked are the ones the real spec compiles to: its IR's kernel variants.
SPEC = Path(__file__).resolve().parents[1] / "examples" / "mimo_v2_flash.yaml"
HIDDEN, MOE_INTER, INTER = 4096, 2048, 16384
HEAD_CAP: int | None = None  # --smoke caps query heads (keeping the GQA group) to keep the interpreter quick
# --smoke runs every check at tiny sizes on the CPU (Triton interpreter) to exercise this script's own code.
DEVICE = "cuda"


def _bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds of ``fn`` (triton's do_bench: L2 flushed between runs)."""
    if DEVICE != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=30))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    from lmspec.testing import relative_error as rel

    return rel(out.float(), ref.float())


def _outputs(x: Any) -> list[torch.Tensor]:
    return list(x) if isinstance(x, tuple) else [x]


def _copy(t: torch.Tensor | None, *, to_float32: bool, grad: bool) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach().float() if (to_float32 and t.is_floating_point()) else t.detach().clone()
    return t.requires_grad_() if grad and t.is_floating_point() else t


def _grads(outs: list[torch.Tensor], cots: list[torch.Tensor], ins: list[torch.Tensor | None]) -> list[Any]:
    pairs = [(o, c) for o, c in zip(outs, cots, strict=True) if o.requires_grad]
    wanted = [t for t in ins if t is not None and t.requires_grad]
    return list(torch.autograd.grad([o for o, _ in pairs], wanted, [c for _, c in pairs], allow_unused=True))


def check(
    name: str,
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: list[torch.Tensor | None],
    *,
    backward: bool = True,
    extra_timings: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, Any]:
    """Compare kernel and reference (on float32 copies of the same inputs), then time both."""
    from lmspec.testing import tolerance

    k_in = [_copy(t, to_float32=False, grad=backward) for t in inputs]
    r_in = [_copy(t, to_float32=True, grad=backward) for t in inputs]
    with torch.set_grad_enabled(backward):
        k_out = _outputs(kernel(*k_in))
        r_out = _outputs(reference(*r_in))
    k_grads: list[Any] = []
    r_grads: list[Any] = []
    if backward:
        # One set of cotangents, rounded to the kernel's dtype, so both sides differentiate the same thing.
        g = torch.Generator(device=DEVICE).manual_seed(0)
        k_cots = [torch.randn(o.shape, generator=g, device=DEVICE).to(o.dtype) for o in k_out]
        r_cots = [c.to(r.dtype) for c, r in zip(k_cots, r_out, strict=True)]
        k_grads = _grads(k_out, k_cots, k_in)
        r_grads = _grads(r_out, r_cots, r_in)
    errors: dict[str, float] = {}
    for i, (a, b) in enumerate(zip(k_out, r_out, strict=True)):
        if a.is_floating_point():
            errors[f"out{i}"] = relative_error(a, b)
    for i, (a, b) in enumerate(zip(k_grads, r_grads, strict=True)):
        if b is not None:
            errors[f"grad{i}"] = relative_error(a if a is not None else torch.zeros_like(b), b)
    worst = max(errors.values(), default=0.0)
    tol = tolerance(torch.bfloat16)
    row: dict[str, Any] = {"kernel": name, "errors": errors, "worst_error": worst, "tolerance": tol}
    row["verdict"] = "pass" if worst <= tol else "FAIL"
    del k_out, r_out, k_grads, r_grads, r_in

    # Both are timed on the kernel's own (bf16) inputs: the reference is what the model runs without kernels.
    with torch.no_grad():
        row["ms_kernel_fwd"] = _bench(lambda: kernel(*k_in))
        row["ms_reference_fwd"] = _bench(lambda: reference(*k_in))
    if backward:
        for label, fn in (("kernel", kernel), ("reference", reference)):
            cots = [torch.randn_like(o) for o in _outputs(fn(*k_in)) if o.requires_grad]

            def step(fn: Callable[..., Any] = fn, cots: list[torch.Tensor] = cots) -> None:
                outs = [o for o in _outputs(fn(*k_in)) if o.requires_grad]
                torch.autograd.backward(outs, cots)

            row[f"ms_{label}_fwd_bwd"] = _bench(step)
            for t in k_in:
                if t is not None:
                    t.grad = None
    for label, fn in (extra_timings or {}).items():
        try:
            with torch.no_grad():
                row[f"ms_{label}"] = _bench(fn)
        except Exception as e:  # another library's limits (head dims, masks) must not stop the check
            row[f"ms_{label}"] = None
            row.setdefault("notes", []).append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    torch.cuda.empty_cache()
    return row


def _heads(graph: Any, variant: Any) -> tuple[int, int]:
    """(num_heads, num_kv_heads) of the first attention node this variant implements."""
    attrs = graph.node(variant.nodes[0])["attrs"]
    heads, kv_heads = attrs["num_heads"], attrs["num_kv_heads"]
    if HEAD_CAP is not None and heads > HEAD_CAP:
        heads, kv_heads = HEAD_CAP, max(1, kv_heads * HEAD_CAP // heads)
    return heads, kv_heads


def _attention_rows(graph, variants, backend, seq: int) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    from lmspec.compiler.variants import AttentionVariant
    from lmspec.runtime.ops import reference as ref

    rows = []
    for variant in variants:
        if type(variant) is not AttentionVariant:
            continue
        heads, kv_heads = _heads(graph, variant)
        w = variant.window_keys
        kw = {"scale": variant.qk_head_dim**-0.5, "value_scale": variant.value_scale, "window_keys": w}
        label = variant.name

        def run(variant=variant, heads=heads, kv_heads=kv_heads, kw=kw, w=w, label=label) -> dict[str, Any]:
            dt = torch.bfloat16
            q = torch.randn(1, heads, seq, variant.qk_head_dim, device=DEVICE, dtype=dt)
            k = torch.randn(1, kv_heads, seq, variant.qk_head_dim, device=DEVICE, dtype=dt)
            v = torch.randn(1, kv_heads, seq, variant.v_head_dim, device=DEVICE, dtype=dt)
            sinks = torch.randn(heads, device=DEVICE, dtype=dt) + 2.0 if variant.sink else None
            i = torch.arange(seq, device=DEVICE)
            mask = i[None, :] <= i[:, None]
            if w:
                mask &= (i[:, None] - i[None, :]) < w
            import torch.nn.functional as F

            def sdpa() -> torch.Tensor:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=kw["scale"], enable_gqa=True
                )

            extra: dict[str, Callable[[], Any]] = {"sdpa_masked_fwd": sdpa}
            try:
                if DEVICE != "cuda":
                    raise RuntimeError("flex attention is timed on CUDA only")
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                def mask_mod(b, h, qi, ki):
                    ok = qi >= ki
                    return ok & (qi - ki < w) if w else ok

                block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=DEVICE)
                flex = torch.compile(flex_attention)
                extra["flex_block_mask_fwd"] = lambda: flex(
                    q, k, v, block_mask=block_mask, scale=kw["scale"], enable_gqa=True
                )
            except Exception as e:  # flex is optional: older torch, or a head-dim limit
                print(f"  flex attention unavailable: {type(e).__name__}: {e}", file=sys.stderr)
            return check(
                f"{label} (T={seq}, Hq={heads}, Hkv={kv_heads}, bf16)",
                lambda q_, k_, v_, s_: backend.attention(q_, k_, v_, s_, **kw),
                lambda q_, k_, v_, s_: ref.attention(q_, k_, v_, s_, **kw),
                [q, k, v, sinks],
                extra_timings=extra,
            )

        rows.append((label, run))

    def decode() -> dict[str, Any]:
        # 8 sequences decoding one token: a ring buffer of window_keys slots (sliding), a 32k cache (global).
        dt = torch.bfloat16
        out = []
        global_slots = 32768 if DEVICE == "cuda" else 64
        for variant in variants:
            if variant.family != "decode_attention":
                continue
            heads, kv_heads = _heads(graph, variant)
            w = variant.window_keys
            slots, newest = (w, 5000) if w else (global_slots, global_slots - 1)
            kw = {"scale": variant.qk_head_dim**-0.5, "value_scale": variant.value_scale, "window_keys": w}
            pos = torch.arange(newest - slots + 1, newest + 1, device=DEVICE)
            k_pos = torch.empty(slots, dtype=torch.int64, device=DEVICE)
            k_pos[pos % slots] = pos
            k_pos = k_pos.expand(8, slots).contiguous()
            q_pos = torch.full((8, 1), newest, device=DEVICE)
            q = torch.randn(8, heads, 1, variant.qk_head_dim, device=DEVICE, dtype=dt)
            k = torch.randn(8, kv_heads, slots, variant.qk_head_dim, device=DEVICE, dtype=dt)
            v = torch.randn(8, kv_heads, slots, variant.v_head_dim, device=DEVICE, dtype=dt)
            sinks = torch.randn(heads, device=DEVICE, dtype=dt) if variant.sink else None
            out.append(
                check(
                    f"{variant.name} (B=8, slots={slots}, bf16)",
                    lambda q_, k_, v_, s_, kw=kw, q_pos=q_pos, k_pos=k_pos: backend.attention(
                        q_, k_, v_, s_, q_pos=q_pos, k_pos=k_pos, **kw
                    ),
                    lambda q_, k_, v_, s_, kw=kw, q_pos=q_pos, k_pos=k_pos: ref.attention(
                        q_, k_, v_, s_, q_pos=q_pos, k_pos=k_pos, **kw
                    ),
                    [q, k, v, sinks],
                    backward=False,
                )
            )
        return out  # type: ignore[return-value]

    rows.append(("decode", decode))
    return rows


def _other_rows(variants, backend, seq: int) -> list[tuple[str, Callable[[], Any]]]:
    from lmspec.compiler.variants import (
        LMHeadCEVariant,
        MoEVariant,
        RMSNormVariant,
        RoPEVariant,
        SwiGLUVariant,
    )
    from lmspec.runtime.ops import reference as ref

    dt = torch.bfloat16
    n = seq

    def rmsnorm(v: RMSNormVariant) -> dict[str, Any]:
        x = torch.randn(n, HIDDEN, device=DEVICE, dtype=dt)
        r = torch.randn(n, HIDDEN, device=DEVICE, dtype=dt)
        w = torch.randn(HIDDEN, device=DEVICE, dtype=dt)
        return check(
            f"{v.name} (N={n}, H={HIDDEN}, bf16)",
            lambda a, b, c: backend.add_rmsnorm(a, b, c, v.eps),
            lambda a, b, c: ref.add_rmsnorm(a, b, c, v.eps),
            [x, r, w],
        )

    def swiglu(v: SwiGLUVariant) -> dict[str, Any]:
        g = torch.randn(n, INTER, device=DEVICE, dtype=dt)
        u = torch.randn(n, INTER, device=DEVICE, dtype=dt)
        return check(f"{v.name} (N={n}, I={INTER}, bf16)", backend.swiglu, ref.swiglu, [g, u])

    def rope(v: RoPEVariant) -> dict[str, Any]:
        q = torch.randn(1, HEAD_CAP or 64, seq, v.qk_head_dim, device=DEVICE, dtype=dt)
        k = torch.randn(1, 8, seq, v.qk_head_dim, device=DEVICE, dtype=dt)
        ang = torch.randn(seq, v.rope_dim, device=DEVICE)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        return check(
            f"{v.name} (T={seq}, bf16)",
            lambda a, b: backend.rope(a, b, cos, sin),
            # cos/sin follow the inputs' dtype, as HF builds them in the model dtype.
            lambda a, b: ref.rope(a, b, cos.to(a.dtype), sin.to(a.dtype)),
            [q, k],
        )

    def moe(v: MoEVariant) -> list[dict[str, Any]]:
        e = v.num_experts
        x = torch.randn(n, HIDDEN, device=DEVICE, dtype=dt)
        rw = torch.randn(e, HIDDEN, device=DEVICE) * HIDDEN**-0.5
        bias = torch.randn(e, device=DEVICE) * 0.01
        kw = {k: val for k, val in v.constants().items() if k != "num_experts"}  # the routing keywords
        route = check(
            f"{v.name}_route (N={n})",
            lambda a, b: backend.route(a, b, bias, **kw),
            lambda a, b: ref.route(a, b, bias, **kw),
            [x, rw],
        )
        w, idx, _ = ref.route(x, rw, bias, **kw)
        gu = torch.randn(e, 2 * MOE_INTER, HIDDEN, device=DEVICE, dtype=dt) * HIDDEN**-0.5
        dp = torch.randn(e, HIDDEN, MOE_INTER, device=DEVICE, dtype=dt) * MOE_INTER**-0.5
        experts = check(
            f"{v.name}_experts (N={n}, I={MOE_INTER}, bf16)",
            lambda a, b, c, d: backend.moe_experts(a, b, idx, c, d),
            lambda a, b, c, d: ref.moe_experts(a, b, idx, c, d),
            [x, w, gu, dp],
        )
        return [route, experts]

    def ce(v: LMHeadCEVariant) -> dict[str, Any]:
        h = torch.randn(n, HIDDEN, device=DEVICE, dtype=dt)
        w = torch.randn(v.vocab_size, HIDDEN, device=DEVICE, dtype=dt) * HIDDEN**-0.5
        labels = torch.randint(0, v.vocab_size, (n,), device=DEVICE)
        return check(
            f"{v.name} (N={n}, bf16)",
            lambda a, b: backend.lm_head_ce(a, b, labels),
            lambda a, b: ref.lm_head_ce(a, b, labels),
            [h, w],
        )

    runners: dict[type, Callable[[Any], Any]] = {
        RMSNormVariant: rmsnorm,
        SwiGLUVariant: swiglu,
        RoPEVariant: rope,
        MoEVariant: moe,
        LMHeadCEVariant: ce,
    }
    return [(v.name, lambda v=v: runners[type(v)](v)) for v in variants if type(v) in runners]


def _print(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    table = Table(title="lmspec kernels on GPU: error vs reference (bf16 tolerance) and time (ms)")
    for col in ("kernel", "worst err", "verdict", "fwd", "ref fwd", "fwd+bwd", "ref fwd+bwd", "sdpa", "flex"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["kernel"], "-", "[bold red]ERROR[/]", r["error"][:60], "", "", "", "", "")
            continue
        verdict = "[green]pass[/]" if r["verdict"] == "pass" else "[bold red]FAIL[/]"
        table.add_row(
            r["kernel"],
            f"{r['worst_error']:.2e}",
            verdict,
            ms(r.get("ms_kernel_fwd")),
            ms(r.get("ms_reference_fwd")),
            ms(r.get("ms_kernel_fwd_bwd")),
            ms(r.get("ms_reference_fwd_bwd")),
            ms(r.get("ms_sdpa_masked_fwd")),
            ms(r.get("ms_flex_block_mask_fwd")),
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--seq", type=int, default=4096, help="tokens per check (attention sequence length)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting new checks after this")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU interpreter (tests this script)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        global DEVICE, HIDDEN, HEAD_CAP, MOE_INTER, INTER
        DEVICE, HIDDEN, HEAD_CAP, MOE_INTER, INTER = "cpu", 32, 8, 16, 48
        args.seq = min(args.seq, 24)
        import lmspec.runtime.ops.triton_support  # noqa: F401  (interpreter on)
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device, nothing to check. This script compiles the rendered Triton kernels for a GPU; "
            "on a CPU the same kernels are tested in the Triton interpreter by `pytest tests/kernels`."
        )
        return 0
    from lmspec.codegen.kernels import render_kernels
    from lmspec.compiler import lower, run_passes
    from lmspec.compiler.variants import kernel_variants
    from lmspec.runtime.ops.triton_backend import TritonBackend
    from lmspec.spec import load_spec

    start = time.monotonic()
    rows: list[dict[str, Any]] = []
    graph = run_passes(lower(load_spec(SPEC)))
    variants = kernel_variants(graph)
    with tempfile.TemporaryDirectory(prefix="lmspec-gpu-check-") as tmp:
        render_kernels(variants, tmp, spec_name="examples/mimo_v2_flash.yaml")
        backend = TritonBackend(tmp)
        todo = _attention_rows(graph, variants, backend, args.seq) + _other_rows(variants, backend, args.seq)
        for name, run in todo:
            if time.monotonic() - start > args.budget_s:
                rows.append({"kernel": name, "error": "skipped: time budget spent"})
                continue
            print(f"checking {name} ...", file=sys.stderr, flush=True)
            try:
                result = run()
                rows.extend(result if isinstance(result, list) else [result])
            except Exception as e:  # one kernel's failure is a row, the others still run
                rows.append({"kernel": name, "error": f"{type(e).__name__}: {e}"})
            torch.cuda.empty_cache()
    _print(rows)
    payload = {
        "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "seconds": round(time.monotonic() - start, 1),
        "rows": rows,
    }
    args.out.write_text(
        json.dumps(
            payload, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)
        )
    )
    print(f"wrote {args.out}")
    return 0 if all(r.get("verdict") == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
