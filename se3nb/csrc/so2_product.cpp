// Fused float32 CPU kernels for the SO(2) products of se3nb (nbs/03b_so2_product.ipynb, se3nb/so2_product.py).
//
// One m-block of one SO(2) convolution is, for every slot p (a pair of reverse edges sharing radial weights):
//   y[p, r, o] = sum_i x[p, r, i] W_p[o, i]        with   W_p[o, i] = sum_k h[p, k] theta[o, k, i]
// h [P, K]: the last hidden layer of the radial MLP per slot; theta [O, K, I]: the m-block of the folded last radial
// layer, i contiguous; x [P, R, I] and y [P, R, O]: R <= 4 rows per slot. W_p (O x I per slot, 45,056 weights per edge
// in NVIDIA's QM9 layers) is never written to memory: each kernel builds 16 consecutive i of it in one AVX-512 register
// and uses them at once. The four products of autograd:
//   so2_forward     y        = x W^T
//   so2_grad_x      dx       = dy W
//   so2_grad_theta  dtheta_k = sum_p h[p, k] G_p,           G_p[o, i] = sum_r dy[p, r, o] x[p, r, i]
//   so2_grad_h      dh[p, k] = sum_o,i theta[o, k, i] G_p[o, i]   (per slot, or per edge of the slot with `split`)
// Limits, checked here and by the caller (`_native_shape_ok`): float32, contiguous, I % 16 == 0, 1 <= R <= 4, and for
// the weight gradients K % 16 == 0 (grad_h also K <= 128). Compiled with -mavx512f -mavx512dq -mfma -fopenmp.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

constexpr int64_t kSlots = 4;       // slots that share every load of theta in forward and grad_x
constexpr int64_t kSlotChunk = 64;  // slots per parallel task

// Calls f with std::integral_constant<int, R> for R = 1..4: the row count of a product becomes a compile-time constant.
template <typename F>
static void with_rows(int64_t R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{});
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward and input gradient: W(h) in registers

// w[a] = sum_k h[s + a, k] t[k, 0..16] for the ns <= 4 slots from s: 16 weights of W(h) per slot, in registers.
static inline void build_weights(const float* h, const float* t, int64_t K, int64_t I, int64_t s, int64_t ns,
                                 __m512* w) {
  for (int a = 0; a < kSlots; ++a) w[a] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 tk = _mm512_loadu_ps(t + k * I);
    for (int a = 0; a < kSlots; ++a)
      if (a < ns) w[a] = _mm512_fmadd_ps(_mm512_set1_ps(h[(s + a) * K + k]), tk, w[a]);
  }
}

// y[p, r, o] for slots p0..p1 and outputs o0..o1.
template <int R>
static void forward_tile(const float* h, const float* theta, const float* x, float* y, int64_t K, int64_t O,
                         int64_t I, int64_t o0, int64_t o1, int64_t p0, int64_t p1) {
  for (int64_t s = p0; s < p1; s += kSlots) {
    const int64_t ns = std::min(kSlots, p1 - s);
    for (int64_t o = o0; o < o1; ++o) {
      __m512 acc[kSlots][R];
      for (int a = 0; a < kSlots; ++a)
        for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < I; i += 16) {
        __m512 w[kSlots];
        build_weights(h, theta + o * K * I + i, K, I, s, ns, w);
        for (int a = 0; a < kSlots; ++a)
          if (a < ns)
            for (int r = 0; r < R; ++r)
              acc[a][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + ((s + a) * R + r) * I + i), w[a], acc[a][r]);
      }
      for (int a = 0; a < ns; ++a)
        for (int r = 0; r < R; ++r) y[((s + a) * R + r) * O + o] = _mm512_reduce_add_ps(acc[a][r]);
    }
  }
}

// gx[p, r, i..i+16] for slots p0..p1.
template <int R>
static void grad_x_tile(const float* h, const float* theta, const float* gy, float* gx, int64_t K, int64_t O,
                        int64_t I, int64_t i, int64_t p0, int64_t p1) {
  for (int64_t s = p0; s < p1; s += kSlots) {
    const int64_t ns = std::min(kSlots, p1 - s);
    __m512 acc[kSlots][R];
    for (int a = 0; a < kSlots; ++a)
      for (int r = 0; r < R; ++r) acc[a][r] = _mm512_setzero_ps();
    for (int64_t o = 0; o < O; ++o) {
      __m512 w[kSlots];
      build_weights(h, theta + o * K * I + i, K, I, s, ns, w);
      for (int a = 0; a < kSlots; ++a)
        if (a < ns)
          for (int r = 0; r < R; ++r)
            acc[a][r] = _mm512_fmadd_ps(_mm512_set1_ps(gy[((s + a) * R + r) * O + o]), w[a], acc[a][r]);
    }
    for (int a = 0; a < ns; ++a)
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(gx + ((s + a) * R + r) * I + i, acc[a][r]);
  }
}

static void check(const torch::Tensor& h, const torch::Tensor& theta, const torch::Tensor& rows, int64_t width) {
  TORCH_CHECK(h.dim() == 2 && theta.dim() == 3 && rows.dim() == 3,
              "expected h [P, K], theta [O, K, I], rows [P, R, *]");
  TORCH_CHECK(h.scalar_type() == at::kFloat && theta.scalar_type() == at::kFloat && rows.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(h.is_contiguous() && theta.is_contiguous() && rows.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(theta.size(1) == h.size(1) && rows.size(0) == h.size(0) && rows.size(2) == width, "shapes do not match");
  TORCH_CHECK(theta.size(2) % 16 == 0 && rows.size(1) >= 1 && rows.size(1) <= 4, "needs I % 16 == 0 and 1 <= R <= 4");
}

torch::Tensor so2_forward(torch::Tensor h, torch::Tensor theta, torch::Tensor x) {
  check(h, theta, x, theta.size(2));
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = x.size(1);
  auto y = torch::empty({P, R, O}, x.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t o_tiles = (O + 3) / 4, chunks = (P + kSlotChunk - 1) / kSlotChunk;
  // tasks: (4 outputs: theta rows that stay in L2) x (64 slots)
  at::parallel_for(0, o_tiles * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = (task / chunks) * 4, o1 = std::min(O, o0 + 4);
      const int64_t p0 = (task % chunks) * kSlotChunk, p1 = std::min(P, p0 + kSlotChunk);
      with_rows(R, [&](auto rows) { forward_tile<decltype(rows)::value>(hp, tp, xp, yp, K, O, I, o0, o1, p0, p1); });
    }
  });
  return y;
}

torch::Tensor so2_grad_x(torch::Tensor h, torch::Tensor theta, torch::Tensor gy) {
  check(h, theta, gy, theta.size(0));
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = gy.size(1);
  auto gx = torch::empty({P, R, I}, gy.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* xp = gx.data_ptr<float>();
  const int64_t i_tiles = I / 16, chunks = (P + kSlotChunk - 1) / kSlotChunk;
  // tasks: (16 inputs: a column of theta, O x K x 16 floats, stays in L2) x (64 slots)
  at::parallel_for(0, i_tiles * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = (task / chunks) * 16, p0 = (task % chunks) * kSlotChunk, p1 = std::min(P, p0 + kSlotChunk);
      with_rows(R, [&](auto rows) { grad_x_tile<decltype(rows)::value>(hp, tp, gp, xp, K, O, I, i, p0, p1); });
    }
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------------------------------
// Weight gradient: G_p is rebuilt per tile, never stored

// grad_theta[o, k, i] = sum_p h[p, k] G_p[o, i],  G_p[o, i] = sum_r gy[p, r, o] x[p, r, i]   (K % 16 == 0).
// 16 k of one (o, 16 i) tile accumulate in registers over a chunk of slots whose x stays in L2.
template <int R>
static void grad_theta_tile(const float* h, const float* x, const float* gy, float* gt, int64_t K, int64_t O,
                            int64_t I, int64_t o0, int64_t o1, int64_t p0, int64_t p1) {
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t i = 0; i < I; i += 16)
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        float* out = gt + (o * K + k0) * I + i;
        __m512 acc[16];
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_loadu_ps(out + j * I);
        for (int64_t p = p0; p < p1; ++p) {
          __m512 g = _mm512_setzero_ps();
          for (int r = 0; r < R; ++r)
            g = _mm512_fmadd_ps(_mm512_set1_ps(gy[(p * R + r) * O + o]), _mm512_loadu_ps(x + (p * R + r) * I + i), g);
          const float* hp = h + p * K + k0;
          for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(hp[j]), g, acc[j]);
        }
        for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + j * I, acc[j]);
      }
}

torch::Tensor so2_grad_theta(torch::Tensor h, torch::Tensor x, torch::Tensor gy) {
  TORCH_CHECK(h.dim() == 2 && x.dim() == 3 && gy.dim() == 3 && x.size(0) == h.size(0) && gy.size(0) == h.size(0) &&
                  gy.size(1) == x.size(1),
              "expected h [P, K], x [P, R, I], gy [P, R, O]");
  TORCH_CHECK(h.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && gy.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(h.is_contiguous() && x.is_contiguous() && gy.is_contiguous(), "contiguous tensors only");
  const int64_t P = h.size(0), K = h.size(1), O = gy.size(2), I = x.size(2), R = x.size(1);
  TORCH_CHECK(K % 16 == 0 && I % 16 == 0 && R >= 1 && R <= 4, "needs K % 16 == 0, I % 16 == 0 and 1 <= R <= 4");
  auto gt = torch::zeros({O, K, I}, x.options());
  const float *hp = h.data_ptr<float>(), *xp = x.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* tp = gt.data_ptr<float>();
  const int64_t chunk = std::max<int64_t>(16, (256 << 10) / (4 * R * I));  // slots whose x fills ~256 KB of L2
  // each thread owns rows o of the result: no reduction across threads
  at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t p0 = 0; p0 < P; p0 += chunk) {
      const int64_t p1 = std::min(P, p0 + chunk);
      with_rows(R, [&](auto rows) { grad_theta_tile<decltype(rows)::value>(hp, xp, gp, tp, K, O, I, o0, o1, p0, p1); });
    }
  });
  return gt;
}

// ---------------------------------------------------------------------------------------------------------------------
// Hidden-unit gradient

// grad_h[u, k] = sum_o sum_i theta[o, k, i] G_u[o, i] for units u: slots (rows 0..R), or with `split` (slot, edge)
// pairs (rows of edge e: e R/2 .. (e+1) R/2). Two units share every load of theta; G of 8 tiles of 16 i per unit in
// registers. Adds the sums over outputs o0..o1 to out[0..2K].
static void grad_h_pair(const float* theta, const float* x, const float* gy, float* out, int64_t K, int64_t O,
                        int64_t I, int64_t R, int64_t o0, int64_t o1, const int64_t slot[2], const int64_t r0[2],
                        const int64_t r1[2]) {
  alignas(64) float acc[2][128 * 16];
  for (int u = 0; u < 2; ++u)
    for (int64_t j = 0; j < K * 16; ++j) acc[u][j] = 0.f;
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t i0 = 0; i0 < I; i0 += 128) {
      const int nt = (int)std::min<int64_t>(8, (I - i0) / 16);
      __m512 G[2][8];
      for (int u = 0; u < 2; ++u)
        for (int t = 0; t < 8; ++t)
          if (t < nt) {
            __m512 g = _mm512_setzero_ps();
            for (int64_t r = r0[u]; r < r1[u]; ++r)
              g = _mm512_fmadd_ps(_mm512_set1_ps(gy[(slot[u] * R + r) * O + o]),
                                  _mm512_loadu_ps(x + (slot[u] * R + r) * I + i0 + 16 * t), g);
            G[u][t] = g;
          }
      const float* th = theta + o * K * I + i0;
      for (int64_t k = 0; k < K; ++k) {
        __m512 a0 = _mm512_load_ps(acc[0] + k * 16), a1 = _mm512_load_ps(acc[1] + k * 16);
        for (int t = 0; t < 8; ++t)
          if (t < nt) {
            const __m512 tk = _mm512_loadu_ps(th + k * I + 16 * t);
            a0 = _mm512_fmadd_ps(tk, G[0][t], a0);
            a1 = _mm512_fmadd_ps(tk, G[1][t], a1);
          }
        _mm512_store_ps(acc[0] + k * 16, a0);
        _mm512_store_ps(acc[1] + k * 16, a1);
      }
    }
  for (int u = 0; u < 2; ++u)
    for (int64_t k = 0; k < K; ++k) out[u * K + k] += _mm512_reduce_add_ps(_mm512_load_ps(acc[u] + k * 16));
}

torch::Tensor so2_grad_h(torch::Tensor theta, torch::Tensor x, torch::Tensor gy, bool split) {
  TORCH_CHECK(theta.dim() == 3 && x.dim() == 3 && gy.dim() == 3 && x.size(0) == gy.size(0) &&
                  x.size(1) == gy.size(1) && theta.size(0) == gy.size(2) && theta.size(2) == x.size(2),
              "expected theta [O, K, I], x [P, R, I], gy [P, R, O]");
  TORCH_CHECK(theta.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && gy.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(theta.is_contiguous() && x.is_contiguous() && gy.is_contiguous(), "contiguous tensors only");
  const int64_t P = x.size(0), R = x.size(1), I = x.size(2), O = theta.size(0), K = theta.size(1);
  TORCH_CHECK(K % 16 == 0 && K <= 128 && I % 16 == 0 && R >= 1 && R <= 4 && (!split || R % 2 == 0),
              "needs K % 16 == 0, K <= 128, I % 16 == 0, 1 <= R <= 4 (even with split)");
  const int64_t U = split ? 2 * P : P, pairs = (U + 1) / 2;
  // an odd last unit is paired with itself; its copy lands in a spare row
  auto gh = torch::zeros({2 * pairs, K}, x.options());
  const float *tp = theta.data_ptr<float>(), *xp = x.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* hp = gh.data_ptr<float>();
  // theta is read in blocks of outputs of ~256 KB that stay in L2 while all of a thread's units pass
  const int64_t o_block = std::max<int64_t>(1, (256 << 10) / (4 * K * I));
  at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o0 = 0; o0 < O; o0 += o_block)
      for (int64_t pair = begin; pair < end; ++pair) {
        int64_t slot[2], r0[2], r1[2];
        for (int u = 0; u < 2; ++u) {
          const int64_t unit = std::min(2 * pair + u, U - 1);
          slot[u] = split ? unit / 2 : unit;
          r0[u] = split ? (unit % 2) * (R / 2) : 0;
          r1[u] = split ? r0[u] + R / 2 : R;
        }
        grad_h_pair(tp, xp, gp, hp + 2 * pair * K, K, O, I, R, o0, std::min(O, o0 + o_block), slot, r0, r1);
      }
  });
  return gh.narrow(0, 0, U);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("so2_forward", &so2_forward, "y = x W(h)^T per slot (h [P, K], theta [O, K, I], x [P, R, I]) -> [P, R, O]");
  m.def("so2_grad_x", &so2_grad_x, "dx = dy W(h) per slot (h [P, K], theta [O, K, I], gy [P, R, O]) -> [P, R, I]");
  m.def("so2_grad_theta", &so2_grad_theta, "dtheta (h [P, K], x [P, R, I], gy [P, R, O]) -> [O, K, I]");
  m.def("so2_grad_h", &so2_grad_h, "dh per slot, or per edge with split (theta, x, gy, split) -> [P or 2P, K]");
}
