#!/usr/bin/env python3
"""PyTorch peers of the crate's ops, timed like the Rust benches, printed as the same records.

Run by scripts/gpu-validate.sh on the GPU machine (PyTorch there, nothing to install):

    python3 scripts/torch_peers.py --model mixtral [--tokens 1,16,64,4096,16384]

For each token count of the model's shape (the Mixtral-like and DeepSeek-like layers of
benches/common/mod.rs) it times, on random inputs and a random top-k routing:
  router/select               torch.topk + softmax over the k logits     (torch_topk_softmax)
  dispatch/permute_bf16       index_select of token rows                 (torch_index_select)
  dispatch/combine_bf16       index_add of weighted expert rows          (torch_index_add)
  gemm/*                      torch._grouped_mm (CUTLASS's sm90 grouped  (torch_grouped_mm)
                              GEMM) with the same epilogues as elementwise ops; weight
                              gradients in bf16 (half our f32 bytes: the peer's advantage)
  layers/moe_forward[_backward]_bf16  an HF-style MoE block: linear gate, softmax, top-k, a
                              loop over the experts that got tokens, index_add (torch_hf_block)
Timing as in benches/common/gpu.rs: CUDA events around each call, 3 warm-up calls, the L2
flushed before every call by reading a buffer twice its size, 10 to 50 samples (0.25 s per
op), the median with p10 and p90. Floors are benches/common/floors.rs's and the router and
dispatch benches', so that % of floor compares. An op PyTorch rejects is reported and skipped.
"""
import argparse
import sys

TAG = "MOE_BENCH"
MODELS = {
    # d, h, E, k: benches/common/mod.rs
    "mixtral": (4096, 14336, 8, 2),
    "deepseek": (7168, 2048, 256, 8),
}
TOKENS = [1, 16, 64, 4096, 16384]
BF16, F32, I32 = 2, 4, 4
WARM_UP, MIN_SAMPLES, MAX_SAMPLES, SAMPLE_SECONDS = 3, 10, 50, 0.25


def floors(tokens, d, h, experts, k, active):
    """The floors (bytes, tensor flops) of every op, as the Rust benches count them."""
    t, rows = tokens, tokens * k
    w1, w2 = active * 2 * h * d, active * d * h
    return {
        "router/select": (t * experts * F32 + experts * F32 + 2 * t * k * 4, 0),
        "dispatch/permute_bf16": (t * d * BF16 + rows * I32 + rows * d * BF16, 0),
        "dispatch/combine_bf16": (rows * d * BF16 + rows * 8 + 2 * t * d * BF16, 0),
        "gemm/gemm1_swiglu_bf16": (BF16 * (t * d + w1 + rows * h + rows * 2 * h), 2 * rows * 2 * h * d),
        "gemm/gemm2_weighted_bf16": (BF16 * (rows * h + w2 + rows * d), 2 * rows * d * h),
        "gemm/dgrad2_swiglu_bwd_bf16": (BF16 * (rows * d + w2 + 2 * rows * 2 * h), 2 * rows * d * h),
        "gemm/dgrad1_bf16": (BF16 * (rows * 2 * h + w1 + rows * d), 2 * rows * 2 * h * d),
        "gemm/wgrad1_bf16": (BF16 * (rows * 2 * h + t * d) + F32 * w1, 2 * rows * 2 * h * d),
        "gemm/wgrad2_bf16": (BF16 * (rows * d + rows * h) + F32 * w2, 2 * rows * d * h),
    }


def layer_floors(tokens, d, h, experts, k, active):
    t = tokens
    forward = (BF16 * (2 * t * d + experts * d + active * 3 * h * d), 2 * t * experts * d + 2 * t * k * 3 * h * d)
    training = (
        forward[0] + BF16 * 2 * t * d + F32 * (experts * d + active * 3 * h * d),
        3 * forward[1],
    )
    return {"layers/moe_forward_bf16": forward, "layers/moe_forward_backward_bf16": training}


class Timer:
    def __init__(self, torch):
        self.torch = torch
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush = torch.rand(max(2 * l2 // 4, 1 << 20), device="cuda")

    def time(self, run):
        torch = self.torch

        def timed():
            self.flush.sum()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            return start, end

        for _ in range(WARM_UP):
            timed()
        start, end = timed()
        torch.cuda.synchronize()
        first = start.elapsed_time(end) / 1e3
        samples = min(MAX_SAMPLES, max(MIN_SAMPLES, int(SAMPLE_SECONDS / max(first, 1e-6))))
        events = [timed() for _ in range(samples)]
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) / 1e3 for s, e in events)

        def rank(p):
            return times[max(1, -(-p * len(times) // 100)) - 1]

        return rank(50), rank(10), rank(90)


def record(timer, op, shape, impl, floor, run):
    try:
        median, p10, p90 = timer.time(run)
    except Exception as e:  # an op this PyTorch or GPU rejects: say so, go on
        print(f"torch_peers: {op} {shape} [{impl}] skipped: {type(e).__name__}: {e}".replace("\n", " "))
        return
    print(f"{op} {shape} [{impl}]: median {median * 1e6:.2f} us (p10 {p10 * 1e6:.2f}, p90 {p90 * 1e6:.2f})")
    print(
        f"{TAG} op={op} shape={shape} impl={impl} us={median * 1e6:.3f} p10={p10 * 1e6:.3f} "
        f"p90={p90 * 1e6:.3f} bytes={floor[0]} flops={floor[1]}",
        flush=True,
    )


def routing(torch, tokens, experts, k):
    """k distinct random experts per token: ids [T, k], and dispatch's order of the slots."""
    ids = torch.rand(tokens, experts, device="cuda").topk(k, dim=1).indices.to(torch.int32)
    flat = ids.flatten()
    order = torch.argsort(flat * (tokens * k) + torch.arange(tokens * k, device="cuda", dtype=torch.int32))
    counts = torch.bincount(flat.long(), minlength=experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return ids, order, offs, int((counts > 0).sum())


class ExpertWeights:
    """The experts' W1 [E, 2h, d] and W2 [E, d, h] in bf16, each also laid out column-major in
    its last two dimensions (what torch._grouped_mm's CUTLASS path takes as mat_b)."""

    def __init__(self, torch, d, h, experts):
        bf = dict(device="cuda", dtype=torch.bfloat16)
        self.w1 = torch.randn(experts, 2 * h, d, **bf).mul_(d**-0.5)
        self.w2 = torch.randn(experts, d, h, **bf).mul_(h**-0.5)
        self.w1_cm = self.w1.transpose(-2, -1).contiguous().transpose(-2, -1)
        self.w2_cm = self.w2.transpose(-2, -1).contiguous().transpose(-2, -1)


def first_working(candidates):
    """The first of `candidates` (closures) that runs: layouts torch._grouped_mm may reject."""
    errors = []
    for run in candidates:
        try:
            run()
            return run
        except Exception as e:  # this layout is not supported here: try the next
            errors.append(f"{type(e).__name__}: {e}".replace("\n", " "))
    raise RuntimeError("; ".join(errors))


def bench_ops(torch, timer, model, tokens, weights):
    F = torch.nn.functional
    d, h, experts, k = MODELS[model]
    shape = f"{model},T={tokens}"
    rows = tokens * k
    ids, order, offs, active = routing(torch, tokens, experts, k)
    fl = floors(tokens, d, h, experts, k, active)
    bf = dict(device="cuda", dtype=torch.bfloat16)

    logits = torch.randn(tokens, experts, device="cuda")

    def select():
        values, chosen = logits.topk(k, dim=1)
        return values.softmax(dim=1), chosen

    record(timer, "router/select", shape, "torch_topk_softmax", fl["router/select"], select)

    x = torch.randn(tokens, d, **bf)
    token_of_row = order // k
    record(timer, "dispatch/permute_bf16", shape, "torch_index_select", fl["dispatch/permute_bf16"],
           lambda: x.index_select(0, token_of_row))
    yp = torch.randn(rows, d, **bf)
    w_rows = torch.rand(rows, device="cuda").to(torch.bfloat16)

    def combine():
        return x.clone().index_add_(0, token_of_row, yp * w_rows[:, None])

    record(timer, "dispatch/combine_bf16", shape, "torch_index_add", fl["dispatch/combine_bf16"], combine)

    w1, w2, w1_cm, w2_cm = weights.w1, weights.w2, weights.w1_cm, weights.w2_cm
    xp = torch.randn(rows, d, **bf)
    hid = torch.randn(rows, h, **bf)
    gu = torch.randn(rows, 2 * h, **bf)
    dy = torch.randn(rows, d, **bf)
    dgu = torch.randn(rows, 2 * h, **bf)
    # The transposed activations of the weight gradients, copied once outside the timing, for
    # a PyTorch that takes only row-major mat_a.
    dgu_t, dy_t = dgu.t().contiguous(), dy.t().contiguous()
    mm = torch._grouped_mm

    def swiglu(out):
        return F.silu(out[:, :h]) * out[:, h:]

    def swiglu_backward(dh):
        g, u = gu[:, :h].float(), gu[:, h:].float()
        sig = torch.sigmoid(g)
        return torch.cat((dh * u * sig * (1 + g * (1 - sig)), dh * g * sig), dim=1).to(torch.bfloat16)

    ops = {
        "gemm/gemm1_swiglu_bf16": [lambda: swiglu(mm(xp, w1.transpose(-2, -1), offs=offs))],
        "gemm/gemm2_weighted_bf16": [lambda: mm(hid, w2.transpose(-2, -1), offs=offs) * w_rows[:, None]],
        "gemm/dgrad2_swiglu_bwd_bf16": [
            lambda: swiglu_backward(mm(dy, w2_cm, offs=offs)),
            lambda: swiglu_backward(mm(dy, w2, offs=offs)),
        ],
        "gemm/dgrad1_bf16": [lambda: mm(dgu, w1_cm, offs=offs), lambda: mm(dgu, w1, offs=offs)],
        "gemm/wgrad1_bf16": [lambda: mm(dgu.t(), xp, offs=offs), lambda: mm(dgu_t, xp, offs=offs)],
        "gemm/wgrad2_bf16": [lambda: mm(dy.t(), hid, offs=offs), lambda: mm(dy_t, hid, offs=offs)],
    }
    for op, candidates in ops.items():
        try:
            run = first_working(candidates)
        except RuntimeError as e:
            print(f"torch_peers: {op} {shape} [torch_grouped_mm] skipped: {e}")
            continue
        record(timer, op, shape, "torch_grouped_mm", fl[op], run)


class HfMoeBlock:
    """The MoE block as Hugging Face's Mixtral writes it: a linear gate, softmax, top-k
    (renormalised), then for each expert that got tokens a SwiGLU FFN on its tokens, weighted,
    index_add-ed into the output. One parameter tensor per expert weight, as HF has."""

    def __init__(self, torch, d, h, experts, k):
        self.torch, self.k, self.experts = torch, k, experts
        bf = dict(device="cuda", dtype=torch.bfloat16)

        def param(*shape, fan_in):
            return (torch.randn(*shape, **bf) / fan_in**0.5).requires_grad_()

        self.gate = param(experts, d, fan_in=d)
        self.w1 = [param(h, d, fan_in=d) for _ in range(experts)]
        self.w3 = [param(h, d, fan_in=d) for _ in range(experts)]
        self.w2 = [param(d, h, fan_in=h) for _ in range(experts)]

    def parameters(self):
        return [self.gate, *self.w1, *self.w3, *self.w2]

    def __call__(self, x):
        torch, F = self.torch, self.torch.nn.functional
        probs = F.softmax(F.linear(x, self.gate), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=self.experts).permute(2, 1, 0)
        for e in torch.nonzero(mask.sum(dim=(-1, -2))).flatten().tolist():
            slot, token = torch.where(mask[e])
            cur = x[token]
            y = F.linear(F.silu(F.linear(cur, self.w1[e])) * F.linear(cur, self.w3[e]), self.w2[e])
            out = out.index_add(0, token, y * weights[token, slot, None])
        return out, int(torch.unique(chosen).numel())


def bench_layer(torch, timer, model, token_counts):
    d, h, experts, k = MODELS[model]
    block = HfMoeBlock(torch, d, h, experts, k)
    for tokens in token_counts:
        shape = f"{model},T={tokens}"
        x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        with torch.no_grad():
            _, active = block(x)
        fl = layer_floors(tokens, d, h, experts, k, active)

        def forward():
            with torch.no_grad():
                block(x)

        def train():
            for p in block.parameters():
                p.grad = None
            out, _ = block(x)
            out.backward(dy)

        record(timer, "layers/moe_forward_bf16", shape, "torch_hf_block", fl["layers/moe_forward_bf16"], forward)
        record(timer, "layers/moe_forward_backward_bf16", shape, "torch_hf_block",
               fl["layers/moe_forward_backward_bf16"], train)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    parser.add_argument("--dry-run", action="store_true", help="print what would be timed; import nothing")
    args = parser.parse_args()
    token_counts = [int(t) for t in args.tokens.split(",")]
    if args.dry_run:
        for tokens in token_counts:
            print(f"{args.model},T={tokens}: router, dispatch, grouped GEMM and HF-block peers")
        return 0
    try:
        import torch
    except ImportError:
        print("torch_peers: PyTorch is not installed here; nothing timed", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        print("torch_peers: no GPU visible to PyTorch; nothing timed", file=sys.stderr)
        return 3
    torch.manual_seed(0)
    timer = Timer(torch)
    print(f"torch_peers: torch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    d, h, experts, _ = MODELS[args.model]
    weights = ExpertWeights(torch, d, h, experts)
    for tokens in token_counts:
        bench_ops(torch, timer, args.model, tokens, weights)
    del weights
    torch.cuda.empty_cache()
    bench_layer(torch, timer, args.model, token_counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
