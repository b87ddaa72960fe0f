"""Prototype, not part of se3nb: the SO(2) product (forward, and backward for x) with W(h) built in registers (a JIT-compiled AVX-512 kernel) against
se3nb's torch path (`_SO2Product`: W(h) = h Theta^T for a block of slots by `torch.mm`, then `torch.bmm`).

Why it exists: on the 2-core CPU, float32 training on average-size QM9 batches is GEMM-bound (see issue 7's notes), and
`torch.mm` on the K = 32 products reaches ~110-130 GFLOPS where this machine peaks near 200. This measures how much a fused
kernel gains on the shapes of NVIDIA's QM9 layers (slots P, block outputs O, block inputs I, rows R = 2s), and checks that it
computes the same. It needs g++, ninja and an AVX-512 CPU; the build goes to torch's extension cache, not the repository.

    python benchmarks/prototypes/so2_fused_products.py [--threads 2]

A library version would also need the third product (gradients of h and Theta from G = gy^T x) and a fallback to the torch
path wherever the kernel cannot be built.
"""
import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r'''
#include <torch/extension.h>
#include <immintrin.h>
// y[p, r, o] = sum_i x[p, r, i] sum_k h[p, k] theta[o, k, i]; h [P, K], theta [O, K, I] (I % 16 == 0), x [P, R, I] (R <= 4)
torch::Tensor so2_forward(torch::Tensor h, torch::Tensor theta, torch::Tensor x) {
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = x.size(1);
  TORCH_CHECK(I % 16 == 0 && R <= 4 && h.is_contiguous() && theta.is_contiguous() && x.is_contiguous());
  auto y = torch::empty({P, R, O}, x.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *xp = x.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  const int64_t OT = 4;  // output rows per tile: 4 x K x I floats (98 KB for I = 192) stay in L2 while all slots pass
  #pragma omp parallel for schedule(static)
  for (int64_t o0 = 0; o0 < O; o0 += OT)
    for (int64_t s = 0; s < P; s += 4) {  // 4 slots share every load of theta
      const int64_t ns = std::min<int64_t>(4, P - s);
      for (int64_t o = o0; o < std::min(O, o0 + OT); ++o) {
        __m512 acc[4][4];
        for (int a = 0; a < 4; ++a) for (int r = 0; r < 4; ++r) acc[a][r] = _mm512_setzero_ps();
        for (int64_t i = 0; i < I; i += 16) {
          __m512 w[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          const float *t = tp + o * K * I + i;
          for (int64_t k = 0; k < K; ++k) {  // 16 weights W(h)[o, i..i+16] of 4 slots, in registers
            const __m512 tk = _mm512_loadu_ps(t + k * I);
            for (int a = 0; a < 4; ++a) if (a < ns) w[a] = _mm512_fmadd_ps(_mm512_set1_ps(hp[(s + a) * K + k]), tk, w[a]);
          }
          for (int a = 0; a < ns; ++a)
            for (int r = 0; r < R; ++r)
              acc[a][r] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + ((s + a) * R + r) * I + i), w[a], acc[a][r]);
        }
        for (int a = 0; a < ns; ++a) for (int r = 0; r < R; ++r) yp[((s + a) * R + r) * O + o] = _mm512_reduce_add_ps(acc[a][r]);
      }
    }
  return y;
}

// backward for x: gx[p, r, i] = sum_o gy[p, r, o] sum_k h[p, k] theta[o, k, i]; gy [P, R, O]
torch::Tensor so2_grad_x(torch::Tensor h, torch::Tensor theta, torch::Tensor gy) {
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = gy.size(1);
  TORCH_CHECK(I % 16 == 0 && R <= 4 && h.is_contiguous() && theta.is_contiguous() && gy.is_contiguous());
  auto gx = torch::empty({P, R, I}, gy.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float *xp = gx.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < I; i += 16)  // one column of theta (O x K x 16 floats, 393 KB for O = 192) stays in L2
    for (int64_t s = 0; s < P; s += 4) {
      const int64_t ns = std::min<int64_t>(4, P - s);
      __m512 acc[4][4];
      for (int a = 0; a < 4; ++a) for (int r = 0; r < 4; ++r) acc[a][r] = _mm512_setzero_ps();
      for (int64_t o = 0; o < O; ++o) {
        __m512 w[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const float *t = tp + o * K * I + i;
        for (int64_t k = 0; k < K; ++k) {
          const __m512 tk = _mm512_loadu_ps(t + k * I);
          for (int a = 0; a < 4; ++a) if (a < ns) w[a] = _mm512_fmadd_ps(_mm512_set1_ps(hp[(s + a) * K + k]), tk, w[a]);
        }
        for (int a = 0; a < ns; ++a)
          for (int r = 0; r < R; ++r) acc[a][r] = _mm512_fmadd_ps(_mm512_set1_ps(gp[((s + a) * R + r) * O + o]), w[a], acc[a][r]);
      }
      for (int a = 0; a < ns; ++a) for (int r = 0; r < R; ++r) _mm512_storeu_ps(xp + ((s + a) * R + r) * I + i, acc[a][r]);
    }
  return gx;
}
'''


def torch_path(h, w, x, O, I):  # se3nb's forward: W(h) for ~4 MB of slots at a time, then batched products
    P, R = x.shape[0], x.shape[1]
    y, step = x.new_empty(P, R, O), max(1, (1 << 20) // (O * I))
    buf = x.new_empty(step * O * I)
    for s0 in range(0, P, step):
        p = min(step, P - s0)
        Wh = torch.mm(h[s0:s0 + p], w.T, out=buf[:p * O * I].view(p, O * I))  # [p, O*I]
        torch.bmm(x[s0:s0 + p], Wh.view(p, O, I).transpose(1, 2), out=y[s0:s0 + p])  # [p, R, O]
    return y


def torch_grad_x(h, w, gy, O, I):  # se3nb's backward for x: W(h) rebuilt, then batched products with the output gradient
    P, R = gy.shape[0], gy.shape[1]
    gx, step = gy.new_empty(P, R, I), max(1, (1 << 20) // (O * I))
    buf = gy.new_empty(step * O * I)
    for s0 in range(0, P, step):
        p = min(step, P - s0)
        Wh = torch.mm(h[s0:s0 + p], w.T, out=buf[:p * O * I].view(p, O * I))
        torch.bmm(gy[s0:s0 + p], Wh.view(p, O, I), out=gx[s0:s0 + p])  # [p, R, I]
    return gx


def median_ms(f, iters=20):
    for _ in range(3): f()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = load_inline('se3nb_so2_fused_products_proto', cpp_sources=[SOURCE], functions=['so2_forward', 'so2_grad_x'],
                      extra_cflags=['-O3', '-march=native', '-fopenmp'], extra_ldflags=['-fopenmp'])
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; float32; K = 32 hidden units")
    print(f"{'product':>8} {'P':>5} {'O':>4} {'I':>4} {'R':>2}  {'torch ms':>9} {'GFLOPS':>7}  {'fused ms':>9} {'GFLOPS':>7}  {'speed-up':>8}  rel. diff")
    # P slots (a QM9 batch of 64: 727 real, 1244 average size); O x I blocks of the QM9 hidden layers (m = 1..3 and m = 0)
    for P, O, I, R in [(727, 192, 192, 4), (727, 128, 128, 4), (727, 64, 64, 4), (727, 128, 64, 2), (1244, 192, 192, 4)]:
        K = 32
        h, x = torch.randn(P, K), torch.randn(P, R, I)
        theta = torch.randn(O, K, I) / 8  # [O, K, I]: the kernel's layout
        w = theta.permute(0, 2, 1).reshape(O * I, K).contiguous()  # [O*I, K]: se3nb's folded layout
        gy = torch.randn(P, R, O)
        flops = 2 * P * K * O * I + 2 * P * R * O * I  # build W(h), apply it
        for name, ref_f, fused_f in (('forward', lambda: torch_path(h, w, x, O, I), lambda: ext.so2_forward(h, theta, x)),
                                     ('grad x', lambda: torch_grad_x(h, w, gy, O, I), lambda: ext.so2_grad_x(h, theta, gy))):
            ref, fused = ref_f(), fused_f()
            diff = ((ref - fused).abs().max() / ref.abs().max()).item()
            t_ref, t_fused = median_ms(ref_f), median_ms(fused_f)
            print(f"{name:>8} {P:>5} {O:>4} {I:>4} {R:>2}  {t_ref:9.2f} {flops / t_ref / 1e6:7.0f}  {t_fused:9.2f}"
                  f" {flops / t_fused / 1e6:7.0f}  {t_ref / t_fused:7.2f}x  {diff:.1e}")


if __name__ == '__main__':
    main()
