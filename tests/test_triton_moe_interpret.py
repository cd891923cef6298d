"""Fused MoE Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

Shape legend: T tokens, A active experts per token, E experts, H hidden, I expert intermediate.

The interpreter is chosen when the kernels are defined, so the checks run in a child
process. fp16 inputs: with triton 3.9 the interpreter's ``tl.dot`` on bf16 operands is
wrong, fp16 is right. Tiny shapes; every path (decode GEMV, grouped with atomic or ordered
top-k sum, the ops' default plan) is compared with ``mxpass.ops.moe_reference`` for every
weight granularity, and the unquantized path with ``experts_reference``, on fresh random
routing: T = 0, T = 1, experts that receive no token, every token on one expert,
duplicate ids, and ids outside [0, E) (which must contribute nothing); and the
quantized-activation variant of the per-token formats (its own tolerance, below).

Tolerance 2**-10 (relative Frobenius): y is rounded to fp16 once in both (2**-11), and h
is rounded to fp16 in both before the down projection; the fp32 sums differ only in
order, which can move h by one fp16 ulp and then, for the W8A8 formats, one element of
the quantized h by one e4m3 step. Measured: 0 to 1.4e-5. A wrong expert, row or scale
gives errors of order 1.
"""

import textwrap

from tests.conftest import run_under_triton_interpreter

_CHILD = textwrap.dedent(
    """
    import torch
    import mxpass.kernels.triton.moe as mk
    from mxpass import quant
    from mxpass.formats import get_format
    from mxpass.ops import experts_reference, moe_reference

    torch.manual_seed(0)
    E, A = 5, 2
    # H: 5 MX blocks, 2 partial 128-wide scale columns, tails in the 64/128-wide K steps;
    # I: 2I = 192 rows, so the up rows start inside a 128-row scale block
    H, I = 160, 96

    def experts(fmt, w):
        parts = [quant.quantize_weight(fmt, w[e].contiguous(), f"w[{e}]") for e in range(w.shape[0])]
        return torch.stack([d for d, _ in parts]), torch.stack([s for _, s in parts])

    def rel(y, ref):
        return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()

    g16 = mk.Grouped(16, 32, 32)
    gemv = mk.Gemv(64, 64, 2)  # N and K tails at H = 160, I = 96
    plans = {
        "decode": mk.Plan(10**6, gemv, gemv, (mk.Regime(10**6 + 1, None, g16, g16),)),
        "grouped": mk.Plan(0, gemv, gemv, (mk.Regime(1, 9, g16, mk.Grouped(16, 64, 32)),
                                           mk.Regime(9, None, mk.Grouped(32, 64, 64, num_warps=2), g16))),
        "grouped-sum": mk.Plan(0, gemv, gemv, (mk.Regime(1, None, g16, g16),), atomic=False),
        # the weight-only kernels with token rows on the left (EVEN_K false at H = 160 / BLOCK_K 64)
        "tokens-left": mk.Plan(0, gemv, gemv, (mk.Regime(1, 9, g16._replace(tokens_left=True),
                                                         mk.Grouped(16, 64, 32, tokens_left=True)),
                                               mk.Regime(9, None, mk.Grouped(32, 64, 64, num_warps=2, tokens_left=True),
                                                         g16._replace(tokens_left=True)))),
    }

    def routings():
        yield "T=0", torch.zeros(0, A, dtype=torch.long)
        yield "T=1", torch.randint(0, E, (1, A))
        yield "empty experts", torch.tensor([0, 2, 3])[torch.randint(0, 3, (6, A))]  # 1 and 4 get none
        one = torch.randint(0, E, (7, A)); one[:, 0] = 3
        yield "all on expert 3", one
        yield "duplicates", torch.full((3, A), 4)

    w13f = (torch.randn(E, 2 * I, H) * 0.1).half()
    w2f = (torch.randn(E, H, I) * 0.1).half()
    # every routing and path for one format per scale kind (mx32, block, channel + int8,
    # unquantized); the others on two routings (the interpreter is slow)
    full = {"mxfp8", "fp8-w-block", "int8", None}
    cases = [None, "mxfp8", "fp8-w-block", "int8", "mxfp8-w", "fp8-dynamic", "fp8-w", "fp8-w-tensor"]
    for name in cases:
        fmt = None if name is None else get_format(name)
        if fmt is None:
            q13, s13, q2, s2 = w13f, torch.empty(0), w2f, torch.empty(0)
            ref_fn = lambda x, ids, tw: experts_reference(x, ids, tw, w13f, w2f, "silu")
        else:
            (q13, s13), (q2, s2) = experts(fmt, w13f), experts(fmt, w2f)
            ref_fn = lambda x, ids, tw: moe_reference(x, ids, tw, q13, s13, q2, s2, fmt, "silu")
        for what, ids in routings():
            if name not in full and what not in ("T=1", "all on expert 3"):
                continue
            T = ids.shape[0]
            x = torch.randn(T, H).half()
            tw = torch.rand(T, A)
            ref = ref_fn(x, ids, tw)
            outs = {p: mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plan) for p, plan in plans.items()
                    if (p != "decode" or T <= 3) and (name in full or p != "grouped-sum")}
            # the two triton_ops with their default plan; int32 ids, fp16 routing weights
            outs["op"] = mk.moe_triton(x, ids.int(), tw.half(), q13, s13, q2, s2, fmt)
            for p, y in outs.items():
                assert y.shape == (T, H) and y.dtype == torch.float16, (name, what, p, y.shape, y.dtype)
                if T:
                    err = rel(y, ref if p != "op" else ref_fn(x, ids, tw.half()))
                    assert err <= 2.0**-10, (name, what, p, err)
            if name in ("fp8-dynamic", "int8") and T:
                # quantized activations: the decode path rounds q * s to fp16 as the reference
                # does; the grouped e4m3 / int8 MMAs use q * s unrounded, which h's
                # requantization amplifies (measured 1.6e-3 to 3.5e-3 here, 1-2e-2 in bf16)
                for p, tol in (("decode", 2.0**-10), ("grouped", 2.0**-6)):
                    if p == "decode" and T > 3:
                        continue
                    y = mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plans[p], quantized_activations=True)
                    assert rel(y, ref) <= tol, (name, what, "quantized activations", p, rel(y, ref))
        if name not in full:
            continue
        # ids outside [0, E): those slots contribute nothing (reference: weight 0 on a valid id)
        ids = torch.tensor([[1, -1], [E, 2], [0, 3], [2**40, 1]])
        x, tw = torch.randn(4, H).half(), torch.rand(4, A)
        bad = (ids < 0) | (ids >= E)
        ref = ref_fn(x, ids.masked_fill(bad, 0), tw.masked_fill(bad, 0.0))
        for p, plan in plans.items():
            err = rel(mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plan), ref)
            assert err <= 2.0**-10, (name, "out of range", p, err)
            if name == "int8":  # the fused op quantizing in its kernels (tolerance above)
                y = mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plan, quantized_activations=True)
                assert rel(y, ref) <= (2.0**-10 if p == "decode" else 2.0**-6), (name, "out of range", p, rel(y, ref))

    # the alignment: offsets = exclusive prefix sum of the valid ids' counts; each expert's
    # segment of sorted_slots holds exactly its slots
    # (in the prep kernel's one program, and, with ALIGN_MAX below S, in the count / scatter kernels)
    ids = torch.tensor([0, 2, 3, 3, 7, 2, -2, 3, 0, 3]).view(5, 2)
    flat = ids.view(-1)
    counts = torch.bincount(flat[(flat >= 0) & (flat < E)], minlength=E)
    # (and with 4 slots per count program: three programs add to one expert's count)
    count_block = mk.COUNT_BLOCK
    for align_max, block in ((mk.ALIGN_MAX, count_block), (4, count_block), (4, 4)):
        mk.ALIGN_MAX, mk.COUNT_BLOCK = align_max, block
        _, sorted_slots, offsets = mk.moe_gate_up_with_plan(torch.randn(5, 64).half(), ids,
                                                            w13f[:, :64, :64].contiguous(), torch.empty(0), "none",
                                                            plans["grouped"])
        assert offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()], (align_max, offsets)
        for e in range(E):
            seg = sorted_slots[offsets[e]:offsets[e + 1]].tolist()
            assert sorted(seg) == (flat == e).nonzero().view(-1).tolist(), (align_max, block, e, seg)
    mk.COUNT_BLOCK = count_block
    # the fused op's whole path with the count / scatter alignment (ALIGN_MAX still 4 < S)
    fmt = get_format("int8")
    (q13, s13), (q2, s2) = experts(fmt, w13f), experts(fmt, w2f)
    ids = torch.randint(0, E, (7, A))
    x, tw = torch.randn(7, H).half(), torch.rand(7, A)
    ref = moe_reference(x, ids, tw, q13, s13, q2, s2, fmt, "silu")
    for quantized, tol in ((False, 2.0**-10), (True, 2.0**-6)):
        y = mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plans["grouped"], quantized_activations=quantized)
        assert rel(y, ref) <= tol, ("count / scatter alignment", quantized, rel(y, ref))
    mk.ALIGN_MAX = 1024
    # NaN / Inf in x with quantized activations: that token's row is NaN (its scale is NaN, as
    # the reference's), every other row is untouched (same values as without the bad token)
    for fmt_name in ("fp8-dynamic", "int8"):
        fmt = get_format(fmt_name)
        (q13, s13), (q2, s2) = experts(fmt, w13f), experts(fmt, w2f)
        x = torch.randn(6, H).half()
        ids = torch.tensor([[0, 1], [1, 2], [0, 2], [3, 1], [0, 1], [4, 0]])
        tw = torch.rand(6, A)
        for p in ("decode", "grouped", "grouped-sum"):
            clean = mk.moe_triton(x, ids, tw, q13, s13, q2, s2, fmt, plans[p], quantized_activations=True)
            bad = x.clone()
            bad[2, 7] = float("nan")
            bad[4, 3] = float("inf")
            y = mk.moe_triton(bad, ids, tw, q13, s13, q2, s2, fmt, plans[p], quantized_activations=True)
            ref = moe_reference(bad, ids, tw, q13, s13, q2, s2, fmt, "silu")
            assert y[[2, 4]].isnan().all() and ref[[2, 4]].isnan().all(), (fmt_name, p)
            keep = [0, 1, 3, 5]
            assert torch.equal(y[keep], clean[keep]), (fmt_name, p, "other rows changed")
    print("ok")
    """
)


def test_moe_kernels_under_triton_interpreter():
    run_under_triton_interpreter(_CHILD, timeout=300)


def test_default_plan_regimes():
    """The default plan's paths by slot count for the benchmark shapes: decode up to max(A, 16, E / 4)
    slots on E >= 32 experts (Qwen3-30B: T <= 4), else up to A (Mixtral: T = 1); consecutive
    grouped regimes above, the last without an upper end."""
    import mxpass.kernels.triton.moe as mk

    for (E, A, H, I), decode in (((128, 8, 2048, 768), 32), ((8, 2, 4096, 14336), 2), ((16, 4, 1056, 352), 4),
                                 ((64, 8, 2048, 768), 16), ((256, 8, 7168, 2048), 64)):
        plan = mk.default_plan(E, A, H, I)
        mk._check_plan(plan, 2)  # consecutive from decode_slots + 1, last open-ended
        assert plan.decode_slots == decode, (E, plan.decode_slots)
        assert plan.regimes[0].gate_up.block_m == 16 and plan.regimes[0].s_hi == 8 * E
        # weight-only kernels with token rows on the left: from 32 to 512 slots per expert, and
        # for MXFP8 weights from 8 per expert on (the same regime bounds)
        mx = mk.default_plan(E, A, H, I, granularity="mx32")
        mk._check_plan(mx, 4)
        assert [r.s_hi for r in mx.regimes] == [r.s_hi for r in plan.regimes]
        # and for 128 x 128 block scales from 32 to 128 per expert only
        blk = mk.default_plan(E, A, H, I, granularity="block")
        mk._check_plan(blk, 3)
        for r, m, b in zip(plan.regimes, mx.regimes, blk.regimes, strict=True):
            lo = r.s_lo  # the regime is S in [s_lo, s_hi)
            assert r.gate_up.tokens_left == r.down.tokens_left == (32 * E <= lo < 512 * E), (E, r)
            assert m.gate_up.tokens_left == m.down.tokens_left == (lo >= 8 * E), (E, m)
            assert b.gate_up.tokens_left == b.down.tokens_left == (32 * E <= lo < 128 * E), (E, b)
        # the fused W8A8 op's plan (its own kernels and tiles): the same decode range, then
        # 16-wide tiles below 32 slots per expert, 64-wide up to 512, down 128-wide above;
        # 128-wide K steps throughout (no conversion in registers)
        q = mk.default_plan(E, A, H, I, quantized=True)
        assert q.decode_slots == plan.decode_slots
        mk._check_plan(q, 2)
        bounds = [b for b in (32 * E, 512 * E) if b > decode + 1]
        assert [r.s_hi for r in q.regimes] == bounds + [None], (E, q.regimes)
        for r in q.regimes:
            assert r.gate_up.block_k == r.down.block_k == 128, (E, r)
            wide = 16 if r.s_hi is not None and r.s_hi <= 32 * E else 64
            assert r.gate_up.block_m == wide and r.down.block_m == (128 if r.s_hi is None else wide), (E, r)
