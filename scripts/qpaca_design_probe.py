"""How QPaCA's 4-bit layer should treat the selected columns: the measurements behind paca_hpu/quantized.py.

Compares, on one bitsandbytes 4-bit weight (NF4, blocksize 64), four ways to compute PaCA's layer
``y = x @ W.T`` with ``W = D``, ``W[:, idx] = D[:, idx] + s * delta`` (``D = dequantize_4bit(Wq)``):

* ``correction`` (paca_hpu.quantized): ``matmul_4bit(x, Wq) + s * x_sel @ delta.T`` (addmm_ into y); backward
  ``grad_y @ (D with + s * delta in the selected columns)``, one GEMM.
* ``correction_2gemm``: same forward; backward ``grad_y @ D`` plus ``index_add_`` of ``s * grad_y @ delta``.
* ``zeroed``: the selected 4-bit codes set to the code of 0.0, ``matmul_4bit(x, Wq0) + x_sel @ (D[:, idx] + s *
  delta).T``; backward ``grad_y @ (D0 with the merged columns)``.
* ``dense_merge``: ``D`` dequantized, merged columns written in, one ``F.linear``; backward the same weight.
* ``floor``: bitsandbytes' own ``matmul_4bit`` with autograd (QLoRA's frozen base layer, no adapter).

Exactness (``--exact_tokens`` tokens): relative errors of ``y`` and ``grad_x`` against float64 computed from ``D``
(float32 products, exact in float64), and ``upd``: the weight update ``s * delta`` as the layer really applies it,
recovered from its outputs by least squares, against float64 (what rounding merged columns in the compute dtype
loses; output rounding averages out over the tokens). Speed (``--tokens`` tokens): forward + backward,
interleaved rounds, medians with quartiles.

Run: ``PYTHONPATH=. python scripts/qpaca_design_probe.py [--threads 2] [--rounds 15]`` (about a minute).
"""

import argparse
import copy
import os
import statistics
import time

import torch
import torch.nn.functional as F


def _dq(wq, qs, dtype):
    import bitsandbytes.functional as bnbF

    qs = copy.copy(qs)
    qs.dtype = dtype
    return bnbF.dequantize_4bit(wq, qs)


class _Generic(torch.autograd.Function):
    """forward(x, delta) = fwd(x, delta); backward via the variant's own bwd weight (or 2-GEMM) form."""

    @staticmethod
    def forward(ctx, x, delta, impl):
        ctx.impl = impl
        x_sel = x.index_select(-1, impl.idx)
        ctx.save_for_backward(x_sel, delta)
        return impl.fwd(x, x_sel, delta)

    @staticmethod
    def backward(ctx, g):
        x_sel, delta = ctx.saved_tensors
        impl = ctx.impl
        gx = impl.bwd_x(g, delta)
        gd = (x_sel.reshape(-1, x_sel.shape[-1]).float().t() @ g.reshape(-1, g.shape[-1]).float()).t() * impl.s
        return gx, gd, None


class Impl:
    def __init__(self, kind, wq, qs, idx, s, cd):
        import bitsandbytes as bnb

        self.bnb, self.kind, self.wq, self.qs, self.idx, self.s, self.cd = bnb, kind, wq, qs, idx, s, cd
        self.orig = _dq(wq, qs, torch.float32).index_select(1, idx)
        if kind == "zeroed":
            zero_code = 7 if qs.quant_type == "nf4" else 0
            codes = torch.empty(wq.numel() * 2, dtype=torch.uint8)
            flat = wq.view(-1)
            codes[0::2], codes[1::2] = flat >> 4, flat & 0xF
            codes = codes.view(qs.shape[0], qs.shape[1])
            codes[:, idx] = zero_code
            codes = codes.view(-1)
            self.wq = ((codes[0::2] << 4) | codes[1::2]).view(-1, 1)

    def merged_cols(self, delta):
        return (self.orig + self.s * delta).to(self.cd)

    def merged_hilo(self, delta):
        m = self.orig + self.s * delta
        hi = m.to(self.cd)
        return torch.cat([hi, (m - hi.float()).to(self.cd)], 1)

    def fwd(self, x, x_sel, delta):
        if self.kind.startswith("correction"):
            y = self.bnb.matmul_4bit(x, self.wq, quant_state=self.qs)
            y.view(-1, y.shape[-1]).addmm_(x_sel.reshape(-1, x_sel.shape[-1]), delta.t().to(self.cd), alpha=self.s)
            return y
        if self.kind == "zeroed":
            y = self.bnb.matmul_4bit(x, self.wq, quant_state=self.qs)
            y.view(-1, y.shape[-1]).addmm_(x_sel.reshape(-1, x_sel.shape[-1]), self.merged_cols(delta).t())
            return y
        if self.kind.startswith("zeroed_input"):
            y = self.bnb.matmul_4bit(x.index_fill(-1, self.idx, 0), self.wq, quant_state=self.qs)
            xs = x_sel.reshape(-1, x_sel.shape[-1])
            if self.kind == "zeroed_input_hilo" and self.cd != torch.float32:
                y.view(-1, y.shape[-1]).addmm_(torch.cat([xs, xs], 1), self.merged_hilo(delta).t())
            else:
                y.view(-1, y.shape[-1]).addmm_(xs, self.merged_cols(delta).t())
            return y
        w = _dq(self.wq, self.qs, self.cd)  # dense_merge
        w.index_add_(1, self.idx, delta.to(self.cd), alpha=self.s)
        return F.linear(x, w)

    def bwd_x(self, g, delta):
        w = _dq(self.wq, self.qs, self.cd)
        if self.kind == "correction_2gemm":
            gx = g @ w
            gx.index_add_(-1, self.idx, (g @ delta.to(self.cd)).mul_(self.s))
            return gx
        if self.kind.startswith("zeroed"):
            w.index_copy_(1, self.idx, self.merged_cols(delta))
        else:
            w.index_add_(1, self.idx, delta.to(self.cd), alpha=self.s)
        return g @ w


KINDS = ("correction", "correction_2gemm", "zeroed", "zeroed_input", "zeroed_input_hilo", "dense_merge")


def run_variant(kind, impls, x, delta, g):
    if kind == "floor":
        bnb, wq, qs = impls["correction"].bnb, impls["correction"].wq, impls["correction"].qs
        y = bnb.matmul_4bit(x, wq, quant_state=qs)
    else:
        y = _Generic.apply(x, delta, impls[kind])
    y.backward(g)
    return y


def exactness(impls, wq, qs, idx, s, cd, x64, delta_scale, seed=1):
    """Relative errors against float64: ``y``, ``grad_x``, and ``update`` = the adapter's weight update as the
    layer applies it, recovered from the outputs by least squares (``y - x @ D.T = x_sel @ U.T + rounding noise``,
    solved for ``U``, compared with ``s * delta``): what rounding merged columns in the compute dtype loses."""
    d64 = _dq(wq, qs, torch.float32).double()
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(d64.shape[0], idx.numel(), generator=gen) * (delta_scale * d64.std().item() / s)
    w64 = d64.clone()
    w64[:, idx] += s * delta.double()
    y_ref = x64 @ w64.t()
    g64 = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    gx_ref = g64 @ w64
    xs64 = x64[..., idx].reshape(-1, idx.numel())
    out = {}
    x = x64.to(cd)
    for kind in KINDS:
        xr = x.clone().requires_grad_(True)
        dr = delta.clone().requires_grad_(True)
        y = _Generic.apply(xr, dr, impls[kind])
        y.backward(g64.to(cd))
        resid = (y.detach().double() - x64 @ d64.t()).reshape(-1, y.shape[-1])
        u_hat = torch.linalg.lstsq(xs64, resid).solution.t()
        u_ref = s * delta.double()
        out[kind] = {
            "y_err": float((y.detach().double() - y_ref).norm() / y_ref.norm()),
            "grad_x_err": float((xr.grad.double() - gx_ref).norm() / gx_ref.norm()),
            "update_err": float((u_hat - u_ref).norm() / u_ref.norm()),
        }
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--exact_tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--shapes", default="576x576,576x1536,1536x576", help="in x out")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes")
    p.add_argument("--no_exactness", action="store_true", help="timing only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import bitsandbytes
    import bitsandbytes.functional as bnbF

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, threads {torch.get_num_threads()}, "
          f"load average before {os.getloadavg()[0]:.2f}")
    s = 16 / args.r
    for shape in args.shapes.split(","):
        fin, fout = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(fout, fin, generator=gen) * 0.02
        wq, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        idx = torch.randperm(fin, generator=gen)[: args.r].sort().values
        x64 = torch.randn(4, args.tokens // 4, fin, generator=gen, dtype=torch.float64)
        x64_exact = torch.randn(4, args.exact_tokens // 4, fin, generator=gen, dtype=torch.float64)
        for cd in [getattr(torch, d) for d in args.dtypes.split(",")]:
            impls = {k: Impl(k, wq, qs, idx, s, cd) for k in KINDS}
            for scale in (() if args.no_exactness else (1e-2, 1e-1)):
                ex = exactness(impls, wq, qs, idx, s, cd, x64_exact, scale)
                print(f"{shape} {str(cd)[6:]} s*delta/std(D)={scale:g}: " + "; ".join(
                    f"{k} y {v['y_err']:.1e} gx {v['grad_x_err']:.1e} upd {v['update_err']:.1e}"
                    for k, v in ex.items()))
            delta = (torch.randn(fout, args.r, generator=gen) * 1e-3).requires_grad_(True)
            x = x64.to(cd).requires_grad_(True)
            g = torch.randn(x.shape[:-1] + (fout,), generator=gen).to(cd)
            names = ("floor",) + KINDS
            times = {n: [] for n in names}
            for n in names:
                for _ in range(args.warmup):
                    run_variant(n, impls, x, delta, g)
            for k in range(args.rounds):
                order = names[k % len(names):] + names[:k % len(names)]
                for n in order:
                    t0 = time.perf_counter()
                    run_variant(n, impls, x, delta, g)
                    times[n].append(time.perf_counter() - t0)
                    x.grad = delta.grad = None
            med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
            q = {n: statistics.quantiles(v, n=4) for n, v in times.items()}
            print(f"{shape} {str(cd)[6:]} fwd+bwd ms (median [q1,q3]): " + "; ".join(
                f"{n} {med[n]:.2f} [{q[n][0] * 1e3:.2f},{q[n][2] * 1e3:.2f}]" for n in names))
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
