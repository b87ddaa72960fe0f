// Fused float32 CPU kernels for the SO(2) products of se3nb (nbs/03b_so2_product.ipynb, se3nb/so2_product.py).
//
// One m-block of one SO(2) convolution is, for every slot p (a pair of reverse edges sharing radial weights):
//   y[p, r, o] = sum_i x[p, r, i] W_p[o, i]        with   W_p[o, i] = sum_k h[p, k] w[o, i, k]
// h [P, K]: the last hidden layer of the radial MLP per slot; w [O, I, K]: the m-block of the folded last radial layer
// (theta [O, K, I] is the same numbers with i contiguous); x [P, R, I] and y [P, R, O]: R <= 4 rows per slot. W_p
// (45,056 weights per edge in NVIDIA's QM9 layers) is never written to memory. The four products of autograd:
//   so2_forward  y         = x W^T     W built in registers, VW consecutive i of it at a time, used at once
//   so2_grad_x   dx        = dy W      the same, VW consecutive i of W for one or more o
//   so2_grad_w   dw[o,i,k] = sum_p G_p[o, i] h[p, k],      G_p = dy_p^T x_p (rebuilt per block of slots, never stored)
//   so2_grad_h   dh[u, k]  = sum_o,i G_u[o, i] w[o, i, k]  per slot, or per edge of the slot (`split`)
// The forward may also run as so2_grad_x of W^T, on theta [I, K, O] (`so2_forward_planned`, where measured faster).
//
// Vector ISA: the file compiles for AVX-512 (-mavx512f: 16 floats per register, 32 registers) or AVX2 + FMA (-mavx2
// -mfma: 8 floats, 16 registers), see `load_extension` (00a_backends); `isa()` says which. Why the register tiles look
// as they do: an FMA has a latency of about 4 cycles and server cores issue one 512-bit FMA per cycle (AMD Zen 4) or
// two (Intel Xeon with two FMA ports: Skylake-SP to Emerald Rapids; AMD Zen 5), so a loop needs 4 (Zen 4) to 8 (Xeon,
// Zen 5) independent accumulators to keep the FMA units busy; and each vector of theta loaded must feed several slots,
// or the loads (from L1, or L2 when theta outgrows L1) become the limit. The tile shapes are compiled variants (A slots
// x N vectors: A*N independent accumulators); which variant, and the block sizes, are measured per CPU and block shape
// by the caller (`se3nb/so2_product.py`: a short autotune at first use, cached beside the compiled extension).
//
// Limits, checked here and by the caller: float32, contiguous, I % VW == 0, 1 <= R <= 4; for the weight gradients
// also K % VW == 0 and K <= 8 VW.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
using vec = __m512;
constexpr int VW = 16, NREG = 32;
static const char* kIsa = "avx512";
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm512_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
// the first n < VW floats only (masked: nothing past them is read or written)
static inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
static inline vec vload_first(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
static inline void vstore_first(float* p, vec v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
#define IN_REGISTER(v) asm("" : "+v"(v))  // a loaded vector stays in a register (no reload for each use)
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int VW = 8, NREG = 16;
static const char* kIsa = "avx2";
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vset1(float x) { return _mm256_set1_ps(x); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline __m256i first_lanes(int64_t n) {  // all bits set in the first n of 8 lanes
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec vload_first(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
static inline void vstore_first(float* p, vec v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
#define IN_REGISTER(v) asm("" : "+x"(v))
#else
#error "se3nb's SO(2) kernels need AVX-512F, or AVX2 and FMA"
#endif

// The register tiles (A slots, N vectors) compiled for forward and grad_x; `variant` indexes this table. 8
// accumulators keep two FMA ports of latency 4 busy only if nothing else stalls; with 32 registers, tiles of 16
// leave that slack (AMD Zen 5, NVIDIA's QM9 blocks: 1.15-1.25x; larger tiles measured no faster). AVX2's 16 registers
// hold only the first three.
#if defined(__AVX512F__)
constexpr int kVariants = 5;
constexpr int kTileA[kVariants] = {4, 8, 2, 4, 8};
constexpr int kTileN[kVariants] = {2, 1, 4, 4, 2};
#else
constexpr int kVariants = 3;
constexpr int kTileA[kVariants] = {4, 8, 2};
constexpr int kTileN[kVariants] = {2, 1, 4};
#endif

template <int V = 0, typename F>
static void with_variant(int64_t v, F&& f) {  // v as a compile-time constant; past the table: the last variant
  if constexpr (V + 1 < kVariants) {
    if (v != V) return with_variant<V + 1>(v, f);
  }
  f(std::integral_constant<int, V>{});
}

template <typename F>
static void with_kv(int64_t KV, F&& f) {  // K / VW as a compile-time constant (1..8)
  switch (KV) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{});
  }
}

// w[a][j] = sum_k h[a, k] t[k * ks + j * js + 0..VW) for A slots (rows of h from `h`) and N vectors of theta:
// A*N independent accumulators, each loaded vector of theta used by all A slots.
template <int A, int N>
__attribute__((always_inline)) static inline void build_weights(const float* h, const float* t, int64_t K, int64_t ks,
                                                                int64_t js, vec (&w)[A][N]) {
  for (int a = 0; a < A; ++a)
    for (int j = 0; j < N; ++j) w[a][j] = vzero();
  for (int64_t k = 0; k < K; ++k) {
    vec tk[N];
    for (int j = 0; j < N; ++j) {
      tk[j] = vload(t + k * ks + j * js);
      if (N == 1) IN_REGISTER(tk[j]);  // else compilers fold the load into each of the A FMAs
    }
    for (int a = 0; a < A; ++a) {
      const vec hk = vset1(h[a * K + k]);
      for (int j = 0; j < N; ++j) w[a][j] = vfma(hk, tk[j], w[a][j]);
    }
  }
}

static void check(const torch::Tensor& h, const torch::Tensor& theta, const torch::Tensor& rows, int64_t width) {
  TORCH_CHECK(h.dim() == 2 && theta.dim() == 3 && rows.dim() == 3,
              "expected h [P, K], theta [O, K, I], rows [P, R, *]");
  TORCH_CHECK(h.scalar_type() == at::kFloat && theta.scalar_type() == at::kFloat && rows.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(h.is_contiguous() && theta.is_contiguous() && rows.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(theta.size(1) == h.size(1) && rows.size(0) == h.size(0) && rows.size(2) == width, "shapes do not match");
  TORCH_CHECK(theta.size(2) % VW == 0 && rows.size(1) >= 1 && rows.size(1) <= 4,
              "needs I % ", VW, " == 0 and 1 <= R <= 4");
}

// ---------------------------------------------------------------------------------------------------------------------
// Forward: y = x W^T. Per slot tile and output o: W_p[o, i..i+N VW) for A slots in registers, applied to their rows
// (partial sums over i in acc, a small L1 buffer: its size depends on R, not on the registers), then summed.

template <int A, int N>
static void forward_tile(const float* h, const float* theta, const float* x, float* y, int64_t K, int64_t O, int64_t I,
                         int64_t R, int64_t o, int64_t s) {
  vec acc[A * 4];
  for (int64_t q = 0; q < A * R; ++q) acc[q] = vzero();
  const float* t = theta + o * K * I;
  auto step = [&](int64_t i, auto n) {
    constexpr int NN = decltype(n)::value;
    vec w[A][NN];
    build_weights<A, NN>(h + s * K, t + i, K, I, VW, w);
    for (int a = 0; a < A; ++a)
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < NN; ++j)
          acc[a * R + r] = vfma(vload(x + ((s + a) * R + r) * I + i + j * VW), w[a][j], acc[a * R + r]);
  };
  int64_t i = 0;
  for (; i + N * VW <= I; i += N * VW) step(i, std::integral_constant<int, N>{});
  for (; i < I; i += VW) step(i, std::integral_constant<int, 1>{});
  for (int a = 0; a < A; ++a)
    for (int64_t r = 0; r < R; ++r) y[((s + a) * R + r) * O + o] = vsum(acc[a * R + r]);
}

torch::Tensor so2_forward(torch::Tensor h, torch::Tensor theta, torch::Tensor x, int64_t variant, int64_t o_tile,
                          int64_t slot_chunk) {
  check(h, theta, x, theta.size(2));
  TORCH_CHECK(o_tile >= 1 && slot_chunk >= 1, "o_tile and slot_chunk must be positive");
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = x.size(1);
  auto y = torch::empty({P, R, O}, x.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t o_tiles = (O + o_tile - 1) / o_tile, chunks = (P + slot_chunk - 1) / slot_chunk;
  with_variant(variant, [&](auto v) {
    constexpr int A = kTileA[decltype(v)::value], N = kTileN[decltype(v)::value];
    // tasks: (o_tile outputs) x (slot_chunk slots); theta of one o (K x I) stays in L1 while a task's slots pass
    at::parallel_for(0, o_tiles * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t o0 = (task / chunks) * o_tile, o1 = std::min(O, o0 + o_tile);
        const int64_t p0 = (task % chunks) * slot_chunk, p1 = std::min(P, p0 + slot_chunk);
        for (int64_t o = o0; o < o1; ++o) {
          int64_t s = p0;
          for (; s + A <= p1; s += A) forward_tile<A, N>(hp, tp, xp, yp, K, O, I, R, o, s);
          for (; s < p1; ++s) forward_tile<1, N>(hp, tp, xp, yp, K, O, I, R, o, s);
        }
      }
    });
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------------------
// Input gradient: dx = dy W. Per slot tile and VW inputs i: W_p[o..o+N, i] for A slots in registers, times dy.

template <int A, int N>
static void grad_x_tile(const float* h, const float* theta, const float* gy, float* gx, int64_t K, int64_t O,
                        int64_t I, int64_t R, int64_t i, int64_t o0, int64_t o1, int64_t s) {
  vec acc[A * 4];
  for (int a = 0; a < A; ++a)
    for (int64_t r = 0; r < R; ++r)
      acc[a * R + r] = o0 == 0 ? vzero() : vload(gx + ((s + a) * R + r) * I + i);
  auto step = [&](int64_t o, auto n) {
    constexpr int NN = decltype(n)::value;
    vec w[A][NN];
    build_weights<A, NN>(h + s * K, theta + o * K * I + i, K, I, K * I, w);
    for (int a = 0; a < A; ++a)
      for (int64_t r = 0; r < R; ++r)
        for (int j = 0; j < NN; ++j)
          acc[a * R + r] = vfma(vset1(gy[((s + a) * R + r) * O + o + j]), w[a][j], acc[a * R + r]);
  };
  int64_t o = o0;
  for (; o + N <= o1; o += N) step(o, std::integral_constant<int, N>{});
  for (; o < o1; ++o) step(o, std::integral_constant<int, 1>{});
  for (int a = 0; a < A; ++a)
    for (int64_t r = 0; r < R; ++r) vstore(gx + ((s + a) * R + r) * I + i, acc[a * R + r]);
}

torch::Tensor so2_grad_x(torch::Tensor h, torch::Tensor theta, torch::Tensor gy, int64_t variant, int64_t o_tile,
                         int64_t slot_chunk) {
  check(h, theta, gy, theta.size(0));
  TORCH_CHECK(o_tile >= 1 && slot_chunk >= 1, "o_tile and slot_chunk must be positive");
  const int64_t P = h.size(0), K = h.size(1), O = theta.size(0), I = theta.size(2), R = gy.size(1);
  auto gx = torch::empty({P, R, I}, gy.options());
  const float *hp = h.data_ptr<float>(), *tp = theta.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* xp = gx.data_ptr<float>();
  const int64_t i_tiles = I / VW, chunks = (P + slot_chunk - 1) / slot_chunk;
  with_variant(variant, [&](auto v) {
    constexpr int A = kTileA[decltype(v)::value], N = kTileN[decltype(v)::value];
    // tasks: (VW inputs) x (slot_chunk slots); o_tile x K vectors of theta stay in L1 while the task's slots pass
    at::parallel_for(0, i_tiles * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = (task / chunks) * VW;
        const int64_t p0 = (task % chunks) * slot_chunk, p1 = std::min(P, p0 + slot_chunk);
        for (int64_t o0 = 0; o0 < O; o0 += o_tile) {
          const int64_t o1 = std::min(O, o0 + o_tile);
          int64_t s = p0;
          for (; s + A <= p1; s += A) grad_x_tile<A, N>(hp, tp, gp, xp, K, O, I, R, i, o0, o1, s);
          for (; s < p1; ++s) grad_x_tile<1, N>(hp, tp, gp, xp, K, O, I, R, i, o0, o1, s);
        }
      }
    });
  });
  return gx;
}

// ---------------------------------------------------------------------------------------------------------------------
// Weight gradients, vectorized over k (w's own layout [O, I, K]: no transposed copy of the result)

// Rows of a register tile with KV vectors per row: as many as the registers allow, and a multiple of 4 (tails in 4s).
constexpr int tile_rows(int KV) {
  const int budget = (NREG - KV - 3) / KV;
  return budget >= 16 ? 16 : budget >= 12 ? 12 : budget >= 8 ? 8 : budget >= 4 ? 4 : budget >= 2 ? 2 : 1;
}

template <typename F>
static void with_rows(int64_t R, F&& f) {  // R (1..4 rows of a slot) as a compile-time constant
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{});
  }
}

// G[o, :] = sum_r dy[r, o] x[r, :] for o0 <= o < o1 into g + (o - o0) * I, over R rows of one slot (or of one edge
// of it): x [R, I] and dy [R, O] from the given rows on. T vectors of each row of x stay in registers while the outputs
// pass (x is read once, not once per output, and each dy value is broadcast once per T vectors).
template <int R, int T>
static inline void gradient_rows_tile(const float* x, const float* gy, int64_t O, int64_t I, int64_t o0, int64_t o1,
                                      int64_t i, float* g) {
  vec xv[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) xv[r][t] = vload(x + r * I + i + t * VW);
  for (int64_t o = o0; o < o1; ++o) {
    vec acc[T];
    const vec g0 = vset1(gy[o]);
    for (int t = 0; t < T; ++t) acc[t] = vmul(g0, xv[0][t]);
    for (int r = 1; r < R; ++r) {
      const vec gr = vset1(gy[r * O + o]);
      for (int t = 0; t < T; ++t) acc[t] = vfma(gr, xv[r][t], acc[t]);
    }
    for (int t = 0; t < T; ++t) vstore(g + (o - o0) * I + i + t * VW, acc[t]);
  }
}

// vectors per row of x in registers: a power of two up to 8 with R * T (x) + T (sums) + 1 (dy) within the registers
constexpr int gradient_tile(int R) {
  int t = 8;
  while (t > 1 && R * t + t + 1 > NREG) t /= 2;
  return t;
}

static void gradient_rows(const float* x, const float* gy, int64_t R, int64_t O, int64_t I, int64_t o0, int64_t o1,
                          float* g) {
  with_rows(R, [&](auto r) {
    constexpr int RR = decltype(r)::value, T = gradient_tile(RR);
    int64_t i = 0;
    for (; i + T * VW <= I; i += T * VW) gradient_rows_tile<RR, T>(x, gy, O, I, o0, o1, i, g);
    for (; i < I; i += VW) gradient_rows_tile<RR, 1>(x, gy, O, I, o0, o1, i, g);
  });
}

// dw[o, i, :] += sum_p G_p[o, i] h[p, :] over slots p0..p1, G_p[o, i] at G[(p - p0) * g_stride + i]: IB values of i x
// KV vectors of k accumulate in registers, each G value broadcast once.
template <int KV>
static void grad_w_rows(const float* h, const float* G, int64_t g_stride, float* out, int64_t K, int64_t I, int64_t p0,
                        int64_t p1, bool first) {
  constexpr int IB = tile_rows(KV);
  auto block = [&](int64_t i0, auto nb) {
    constexpr int B = decltype(nb)::value;
    vec acc[B][KV];
    for (int b = 0; b < B; ++b)
      for (int v = 0; v < KV; ++v) acc[b][v] = first ? vzero() : vload(out + (i0 + b) * K + v * VW);
    for (int64_t p = p0; p < p1; ++p) {
      vec hv[KV];
      for (int v = 0; v < KV; ++v) hv[v] = vload(h + p * K + v * VW);
      const float* g = G + (p - p0) * g_stride + i0;
      for (int b = 0; b < B; ++b) {
        const vec gb = vset1(g[b]);
        for (int v = 0; v < KV; ++v) acc[b][v] = vfma(gb, hv[v], acc[b][v]);
      }
    }
    for (int b = 0; b < B; ++b)
      for (int v = 0; v < KV; ++v) vstore(out + (i0 + b) * K + v * VW, acc[b][v]);
  };
  int64_t i0 = 0;
  for (; i0 + IB <= I; i0 += IB) block(i0, std::integral_constant<int, IB>{});
  for (; i0 + 4 <= I; i0 += 4) block(i0, std::integral_constant<int, 4>{});
  for (; i0 < I; ++i0) block(i0, std::integral_constant<int, 1>{});
}

torch::Tensor so2_grad_w(torch::Tensor h, torch::Tensor x, torch::Tensor gy, int64_t slot_chunk,
                         c10::optional<torch::Tensor> out) {
  TORCH_CHECK(h.dim() == 2 && x.dim() == 3 && gy.dim() == 3 && x.size(0) == h.size(0) && gy.size(0) == h.size(0) &&
                  gy.size(1) == x.size(1),
              "expected h [P, K], x [P, R, I], gy [P, R, O]");
  TORCH_CHECK(h.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && gy.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(h.is_contiguous() && x.is_contiguous() && gy.is_contiguous(), "contiguous tensors only");
  const int64_t P = h.size(0), K = h.size(1), O = gy.size(2), I = x.size(2), R = x.size(1);
  TORCH_CHECK(K % VW == 0 && K <= 8 * VW && I % VW == 0 && R >= 1 && R <= 4,
              "needs K % ", VW, " == 0, K <= ", 8 * VW, ", I % ", VW, " == 0 and 1 <= R <= 4");
  TORCH_CHECK(slot_chunk >= 1, "slot_chunk must be positive");
  auto gw = out.has_value() ? *out : torch::empty({O, I, K}, x.options());  // out: a block of the weight's gradient
  TORCH_CHECK(gw.sizes() == at::IntArrayRef({O, I, K}) && gw.is_contiguous() && gw.scalar_type() == at::kFloat,
              "out must be contiguous float32 [", O, ", ", I, ", ", K, "], got ", gw.sizes());
  const float *hp = h.data_ptr<float>(), *xp = x.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* wp = gw.data_ptr<float>();
  if (P == 0) return gw.zero_();
  with_kv(K / VW, [&](auto kv) {
    constexpr int KV = decltype(kv)::value;
    // each thread owns outputs o0..o1 (no reduction across threads). Per chunk of slots, G of all its outputs
    // (slot_chunk x (o1 - o0) x I, sized for L2) is built first, each slot's rows of x read once, then summed into w.
    at::parallel_for(0, O, 1, [&](int64_t o0, int64_t o1) {
      const int64_t no = o1 - o0;
      std::vector<float> G(std::min(slot_chunk, P) * no * I);
      for (int64_t p0 = 0; p0 < P; p0 += slot_chunk) {
        const int64_t p1 = std::min(P, p0 + slot_chunk);
        for (int64_t p = p0; p < p1; ++p)
          gradient_rows(xp + p * R * I, gp + p * R * O, R, O, I, o0, o1, G.data() + (p - p0) * no * I);
        for (int64_t o = o0; o < o1; ++o)
          grad_w_rows<KV>(hp, G.data() + (o - o0) * I, no * I, wp + o * I * K, K, I, p0, p1, p0 == 0);
      }
    });
  });
  return gw;
}

// dh[u, :] (+)= sum_{o0 <= o < o1} sum_i G_u[o, i] w[o, i, :] for UA units (a slot, or one edge's rows of a slot):
// UA x KV accumulators; each vector of w loaded once for all UA units. G of all units is built first for OS = 16, 8
// or 4 outputs at a time (gradient_rows; fewer outputs where the buffer would pass ~40 KB, about L1), the sums read it
// back one value at a time: built per output and input vector instead, it cost 10-40 % of the kernel (AMD Zen 5). The
// sum over i of one o is added to dh before the next o (a sum of I terms, then of O partial sums: float32 rounding as
// small as torch's products have it).
template <int KV, int UA>
static void grad_h_units(const float* w, const float* x, const float* gy, float* dh, int64_t R, int64_t K, int64_t O,
                         int64_t I, int64_t o0, int64_t o1, const int64_t* slot, const int64_t* r0, const int64_t* r1,
                         bool first) {
  int64_t OS = 16;  // outputs per pass of G
  while (OS > 4 && UA * OS * I * 4 > 40 * 1024) OS /= 2;
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(UA * OS * I)) buffer.resize(UA * OS * I);
  float* G = buffer.data();  // [UA, OS, I]
  for (int64_t os = o0; os < o1; os += OS) {
    const int64_t os1 = std::min(o1, os + OS);
    for (int u = 0; u < UA; ++u)
      gradient_rows(x + (slot[u] * R + r0[u]) * I, gy + (slot[u] * R + r0[u]) * O, r1[u] - r0[u], O, I, os, os1,
                    G + u * OS * I);
    for (int64_t o = os; o < os1; ++o) {
      vec acc[UA][KV];
      for (int u = 0; u < UA; ++u)
        for (int v = 0; v < KV; ++v) acc[u][v] = vzero();
      const float* wo = w + o * I * K;
      const float* go = G + (o - os) * I;
      for (int64_t i = 0; i < I; ++i) {
        vec wv[KV];
        for (int v = 0; v < KV; ++v) wv[v] = vload(wo + i * K + v * VW);
        for (int u = 0; u < UA; ++u) {
          const vec gu = vset1(go[u * OS * I + i]);
          for (int v = 0; v < KV; ++v) acc[u][v] = vfma(gu, wv[v], acc[u][v]);
        }
      }
      const bool fresh = first && o == o0;
      for (int u = 0; u < UA; ++u)
        for (int v = 0; v < KV; ++v) {
          float* d = dh + u * K + v * VW;
          vstore(d, fresh ? acc[u][v] : vadd(vload(d), acc[u][v]));
        }
    }
  }
  if (o0 >= o1 && first)
    for (int u = 0; u < UA; ++u)
      for (int v = 0; v < KV; ++v) vstore(dh + u * K + v * VW, vzero());
}

torch::Tensor so2_grad_h(torch::Tensor w, torch::Tensor x, torch::Tensor gy, bool split, int64_t o_block,
                         c10::optional<torch::Tensor> out, bool accumulate) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 3 && gy.dim() == 3 && x.size(0) == gy.size(0) && x.size(1) == gy.size(1) &&
                  w.size(0) == gy.size(2) && w.size(1) == x.size(2),
              "expected w [O, I, K], x [P, R, I], gy [P, R, O]");
  TORCH_CHECK(w.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && gy.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && gy.is_contiguous(), "contiguous tensors only");
  const int64_t P = x.size(0), R = x.size(1), I = x.size(2), O = w.size(0), K = w.size(2);
  TORCH_CHECK(K % VW == 0 && K <= 8 * VW && I % VW == 0 && R >= 1 && R <= 4 && (!split || R % 2 == 0),
              "needs K % ", VW, " == 0, K <= ", 8 * VW, ", I % ", VW, " == 0, 1 <= R <= 4 (even with split)");
  TORCH_CHECK(o_block >= 1, "o_block must be positive");
  const int64_t U = split ? 2 * P : P;  // units: slots, or (slot, edge) pairs
  TORCH_CHECK(out.has_value() || !accumulate, "accumulate needs out");
  auto gh = out.has_value() ? *out : torch::empty({U, K}, x.options());  // out: the sum over the blocks so far
  TORCH_CHECK(gh.sizes() == at::IntArrayRef({U, K}) && gh.is_contiguous() && gh.scalar_type() == at::kFloat,
              "out must be contiguous float32 [", U, ", ", K, "], got ", gh.sizes());
  const float *wp = w.data_ptr<float>(), *xp = x.data_ptr<float>(), *gp = gy.data_ptr<float>();
  float* hp = gh.data_ptr<float>();
  with_kv(K / VW, [&](auto kv) {
    constexpr int KV = decltype(kv)::value;
    constexpr int UA = tile_rows(KV);
    const int64_t groups = (U + UA - 1) / UA;
    // o_block outputs of w (o_block x I x K) stay in L2 while all of a thread's units pass
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ob = 0; ob < O; ob += o_block)
        for (int64_t group = begin; group < end; ++group) {
          const int64_t u0 = group * UA, n = std::min<int64_t>(UA, U - u0), o1 = std::min(O, ob + o_block);
          const bool first = ob == 0 && !accumulate;  // the first sum into dh overwrites it
          int64_t slot[UA], r0[UA], r1[UA];
          for (int u = 0; u < UA; ++u) {
            const int64_t unit = std::min(u0 + u, U - 1);
            slot[u] = split ? unit / 2 : unit;
            r0[u] = split ? (unit % 2) * (R / 2) : 0;
            r1[u] = split ? r0[u] + R / 2 : R;
          }
          if (n == UA) {
            grad_h_units<KV, UA>(wp, xp, gp, hp + u0 * K, R, K, O, I, ob, o1, slot, r0, r1, first);
          } else {
            for (int64_t u = 0; u < n; ++u)
              grad_h_units<KV, 1>(wp, xp, gp, hp + (u0 + u) * K, R, K, O, I, ob, o1, slot + u, r0 + u, r1 + u, first);
          }
        }
    });
  });
  return gh;
}

// ---------------------------------------------------------------------------------------------------------------------
// Every m-block of one product in one call (se3nb/so2_product.py's per-block Python, about 20-30 us a block for views,
// transposes, pads and the kernel calls, was ~5 % of a `small` training step). `sizes`: O*I per block (its rows of
// `weight` [n, K]); `plans`: per block (variant, tile, transposed) of the forward, or in backward (variant, tile) of
// grad_x, o_block of grad_h and slot_chunk of grad_w. Inputs and weights whose I is not a multiple of VW are
// zero-padded here.

static torch::Tensor padded_to(const torch::Tensor& t, int64_t dim, int64_t size) {  // zeros appended along dim
  if (t.size(dim) == size) return t.contiguous();
  std::vector<int64_t> pad(2 * (t.dim() - dim), 0);
  pad[pad.size() - 1] = size - t.size(dim);  // constant_pad_nd's pairs run from the last dimension back
  return at::constant_pad_nd(t, pad);
}

static std::vector<int64_t> checked_blocks(const torch::Tensor& weight, const std::vector<int64_t>& widths,
                                           const std::vector<int64_t>& sizes, const std::vector<int64_t>& plans,
                                           int64_t per_block) {  // the blocks' rows of weight: their offsets
  TORCH_CHECK(sizes.size() == widths.size() && plans.size() == per_block * widths.size(), "one size and ", per_block,
              " plan entries per block");
  std::vector<int64_t> offsets;
  int64_t off = 0;
  for (size_t b = 0; b < widths.size(); ++b) {
    TORCH_CHECK(widths[b] > 0 && sizes[b] % widths[b] == 0, "block ", b, ": ", sizes[b], " weights are not O * I for ",
                widths[b], " inputs");
    offsets.push_back(off), off += sizes[b];
  }
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == off, "weight must be [", off, ", K], got ", weight.sizes());
  return offsets;
}

// The weights of one block as the forward kernels read them: theta [O, K, Ip], or its transpose [Ip, K, O]
static torch::Tensor forward_theta(const torch::Tensor& w, int64_t Ip, bool transposed) {  // w [O, I, K]
  return transposed ? padded_to(w.permute({1, 2, 0}), 0, Ip) : padded_to(w.transpose(1, 2), 2, Ip);
}

// y = x W^T of one block: the forward kernel on theta [O, K, Ip]; or, `transposed`, the input-gradient kernel of W^T
// on theta [Ip, K, O] (O % VW == 0): it sums in vector lanes over outputs instead of across the lanes of each output,
// 1.15-1.6x faster for the 16-48 outputs of the `small` blocks on AMD Zen 5 (the tuning measures both per shape)
torch::Tensor so2_forward_planned(torch::Tensor h, torch::Tensor theta, torch::Tensor x, int64_t variant,
                                  int64_t tile, bool transposed) {
  TORCH_CHECK(!transposed || (theta.dim() == 3 && theta.size(2) % VW == 0),
              "a transposed forward needs theta [I, K, O] with O % ", VW, " == 0, got ", theta.sizes());
  return transposed ? so2_grad_x(h, theta, x, variant, tile, 64) : so2_forward(h, theta, x, variant, tile, 64);
}

// (ys [P, R, O], thetas, inputs [P, R, Ip]) per block: thetas[b] is the forward's [O, K, Ip] for backward, or empty
// after a transposed one; thetas_in: the kept weights of every block (as the plans read them), or none
std::vector<std::vector<torch::Tensor>> so2_forward_blocks(torch::Tensor h, torch::Tensor weight,
                                                          std::vector<torch::Tensor> xs, std::vector<int64_t> sizes,
                                                          std::vector<int64_t> plans,
                                                          std::vector<torch::Tensor> thetas_in) {
  std::vector<int64_t> widths;
  for (const auto& x : xs) {
    TORCH_CHECK(x.dim() == 3, "inputs must be [P, R, I], got ", x.sizes());
    widths.push_back(x.size(2));
  }
  const auto offsets = checked_blocks(weight, widths, sizes, plans, 3);
  TORCH_CHECK(thetas_in.empty() || thetas_in.size() == xs.size(), "no kept weights, or one per block");
  std::vector<torch::Tensor> ys, thetas, inputs;
  h = h.contiguous();
  for (size_t b = 0; b < xs.size(); ++b) {
    const int64_t I = xs[b].size(2), O = sizes[b] / I, Ip = (I + VW - 1) / VW * VW;
    const int64_t* plan = plans.data() + 3 * b;
    const auto w = weight.narrow(0, offsets[b], sizes[b]).view({O, I, -1});
    const auto theta = thetas_in.empty() ? forward_theta(w, Ip, plan[2]) : thetas_in[b];
    inputs.push_back(padded_to(xs[b], 2, Ip));
    ys.push_back(so2_forward_planned(h, theta, inputs[b], plan[0], plan[1], plan[2]));
    thetas.push_back(plan[2] ? at::empty({0}, weight.options()) : theta);
  }
  return {ys, thetas, inputs};
}

// (dx [P, R, I] per block, then dh [P or 2P, K] summed over the blocks if need_h); grad_w [n, K] (or an empty tensor)
// gets every block's dTheta
std::vector<torch::Tensor> so2_backward_blocks(torch::Tensor h, torch::Tensor weight, std::vector<torch::Tensor> thetas,
                                               std::vector<torch::Tensor> inputs, std::vector<int64_t> widths,
                                               std::vector<torch::Tensor> gys, std::vector<int64_t> sizes,
                                               std::vector<int64_t> plans, bool split, bool need_h,
                                               torch::Tensor grad_w) {
  const auto offsets = checked_blocks(weight, widths, sizes, plans, 4);
  TORCH_CHECK(thetas.size() == inputs.size() && widths.size() == inputs.size() && gys.size() == inputs.size(),
              "one weight block, input width and gradient per block");
  h = h.contiguous();
  const int64_t K = h.size(1);
  std::vector<torch::Tensor> out;
  c10::optional<torch::Tensor> dh;
  for (size_t b = 0; b < inputs.size(); ++b) {
    const int64_t I = widths[b], Ip = inputs[b].size(2), O = sizes[b] / I;
    TORCH_CHECK(inputs[b].dim() == 3 && Ip == (I + VW - 1) / VW * VW, "block ", b, ": inputs ", inputs[b].sizes(),
                " are not ", I, " wide, padded to a multiple of ", VW);
    const auto gy = gys[b].contiguous();
    const int64_t* plan = plans.data() + 4 * b;
    const auto w = weight.narrow(0, offsets[b], sizes[b]).view({O, I, K});
    const auto theta = thetas[b].numel() ? thetas[b] : forward_theta(w, Ip, false);  // empty: a transposed forward
    out.push_back(so2_grad_x(h, theta, gy, plan[0], plan[1], 64).narrow(2, 0, I));
    if (need_h) dh = so2_grad_h(padded_to(w, 1, Ip), inputs[b], gy, split, plan[2], dh, dh.has_value());
    if (grad_w.numel() == 0) continue;
    auto gw = grad_w.narrow(0, offsets[b], sizes[b]).view({O, I, K});
    if (Ip == I)
      so2_grad_w(h, inputs[b], gy, plan[3], gw);
    else
      gw.copy_(so2_grad_w(h, inputs[b], gy, plan[3], c10::nullopt).narrow(1, 0, I));
  }
  out.push_back(dh.has_value() ? *dh : torch::Tensor());
  return out;
}

// frame_rotate_rows: the rotations between the global frame and the edge frames (se3nb/so2.py), y[e] = D[e] x[e] for
// D [E, A, B] and x [E, B, C], or y[e] = D[e]^T x[e] for D [E, B, A] (`transpose`). A and B are 2l+1 or 4l+1, so a
// product is a few dozen FMAs per vector of C channels; torch's batched matrix product spends more than that on the
// call per edge (0.1-0.24 ms for 2,418 edges of degree 1-2 with 16 channels, 2 cores).
// With row indices the same pass also moves rows, and either side may be channels first ([., C, B] / [., C, A]): output
// row k is the product of D[d_index[k]] with x[x_index[k]] (an empty index: k itself). The SO(2) messages go back to
// the edges this way (rows by destination, channels first) and their gradient comes back by the inverse permutation,
// one pass each instead of a product, a transpose and a gather.
static void rotate_one(const float* d, const float* xe, float* ye, int64_t A, int64_t B, int64_t C, int64_t sa,
                       int64_t sb) {  // ye [A, C] = D x for one edge; D[a, b] at d[a * sa + b * sb]; xe [B, C]
  for (int64_t a = 0; a < A; ++a) {
    int64_t c = 0;
    for (; c + VW <= C; c += VW) {
      vec acc = vzero();
      for (int64_t b = 0; b < B; ++b) acc = vfma(vset1(d[a * sa + b * sb]), vload(xe + b * C + c), acc);
      vstore(ye + a * C + c, acc);
    }
    if (c < C) {  // channels past the last full vector (e.g. 8 with AVX-512): masked, not one at a time
      vec acc = vzero();
      for (int64_t b = 0; b < B; ++b) acc = vfma(vset1(d[a * sa + b * sb]), vload_first(xe + b * C + c, C - c), acc);
      vstore_first(ye + a * C + c, acc, C - c);
    }
  }
}

static const int64_t* checked_index(const torch::Tensor& index, int64_t rows, const char* what) {  // nullptr: none
  if (index.numel() == 0) return nullptr;
  TORCH_CHECK(index.scalar_type() == torch::kLong && index.dim() == 1 && index.is_contiguous(), what,
              " must be a contiguous int64 vector");
  const int64_t* at = index.data_ptr<int64_t>();
  bool inside = true;  // a plain loop: torch's min() and max() would cost two reductions and allocations per call
  for (int64_t i = 0; i < index.numel(); ++i) inside &= at[i] >= 0 && at[i] < rows;
  TORCH_CHECK(inside, what, " out of range [0, ", rows, ")");
  return at;
}

// The layouts of x and of the result: rows first ([., B, C]), channels first ([., C, B]), or columns of a 2-D buffer
// ([., W]: component b of channel c at column columns[c] + b, e.g. attention's head layout).
enum Layout : int64_t { kRowsFirst = 0, kChannelsFirst = 1, kColumns = 2 };

torch::Tensor frame_rotate_rows(torch::Tensor D, torch::Tensor x, bool transpose, torch::Tensor d_index,
                                torch::Tensor x_index, int64_t x_layout, torch::Tensor x_columns, int64_t out_layout,
                                torch::Tensor out, torch::Tensor out_columns) {
  TORCH_CHECK(D.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(D.dim() == 3 && D.is_contiguous() && x.is_contiguous() && x.dim() == (x_layout == kColumns ? 2 : 3),
              "contiguous D [E, ., .] and x [E, ., .] (columns: [E, W]) only");
  const int64_t A = transpose ? D.size(2) : D.size(1), B = transpose ? D.size(1) : D.size(2);
  const int64_t C = x_layout == kColumns ? x_columns.numel() : x_layout == kChannelsFirst ? x.size(1) : x.size(2);
  TORCH_CHECK(x_layout == kColumns || (x_layout == kChannelsFirst ? x.size(2) : x.size(1)) == B,
              "D [E, A, B] (transposed: [E, B, A]) and x [E, B, C] (channels first: [E, C, B]) do not fit: D ",
              D.sizes(), ", x ", x.sizes());
  const int64_t K = x_index.numel() ? x_index.numel() : d_index.numel() ? d_index.numel() : x.size(0);
  TORCH_CHECK((!d_index.numel() || d_index.numel() == K) && (d_index.numel() || D.size(0) == K) &&
                  (x_index.numel() || x.size(0) == K),
              "one row of D and of x per output row: ", K, " rows, D ", D.sizes(), ", x ", x.sizes());
  const int64_t* di = checked_index(d_index, D.size(0), "d_index");
  const bool same = di && x_index.is_same(d_index) && x.size(0) >= D.size(0);  // one index, in range of both
  const int64_t* xi = same ? di : checked_index(x_index, x.size(0), "x_index");
  const int64_t W_x = x_layout == kColumns ? x.size(1) : 0;
  const int64_t* xc = x_layout == kColumns ? checked_index(x_columns, W_x - B + 1, "x_columns") : nullptr;
  const int64_t* oc = nullptr;
  if (out_layout == kColumns) {
    TORCH_CHECK(out.dim() == 2 && out.size(0) == K && out.is_contiguous() && out.scalar_type() == torch::kFloat &&
                    out_columns.numel() == C,
                "columns: out [", K, ", W] float32 and one column per channel (", C, ")");
    oc = checked_index(out_columns, out.size(1) - A + 1, "out_columns");
  } else {
    out = out_layout == kChannelsFirst ? torch::empty({K, C, A}, x.options()) : torch::empty({K, A, C}, x.options());
  }
  const int64_t W_out = out.size(-1);
  const float *dp = D.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  const int64_t sa = transpose ? 1 : B, sb = transpose ? A : 1;  // strides of D[e] along a and b
  at::parallel_for(0, K, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> xt(x_layout != kRowsFirst ? B * C : 0), yt(out_layout != kRowsFirst ? A * C : 0);
    for (int64_t k = begin; k < end; ++k) {
      const float* d = dp + (di ? di[k] : k) * A * B;
      const int64_t row = xi ? xi[k] : k;
      const float* xe = xp + row * B * C;
      if (x_layout == kChannelsFirst) {  // [C, B] -> [B, C]
        for (int64_t c = 0; c < C; ++c)
          for (int64_t b = 0; b < B; ++b) xt[b * C + c] = xe[c * B + b];
        xe = xt.data();
      } else if (x_layout == kColumns) {
        const float* r = xp + row * W_x;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t b = 0; b < B; ++b) xt[b * C + c] = r[xc[c] + b];
        xe = xt.data();
      }
      float* ye = out_layout == kRowsFirst ? yp + k * A * C : yt.data();
      rotate_one(d, xe, ye, A, B, C, sa, sb);
      if (out_layout == kChannelsFirst) {  // [A, C] -> [C, A]
        for (int64_t c = 0; c < C; ++c)
          for (int64_t a = 0; a < A; ++a) yp[(k * C + c) * A + a] = ye[a * C + c];
      } else if (out_layout == kColumns) {
        float* r = yp + k * W_out;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t a = 0; a < A; ++a) r[oc[c] + a] = ye[a * C + c];
      }
    }
  });
  return out;
}

// frame_rotate_into_blocks: the inputs of one convolution's SO(2) products straight from the node features. Degree d
// (position in Ds / xs) of edge e is D_d[e] x_d[index[e]] (no index: x_d[e]), features rows first ([N, B, C_d]) rotated
// into the edge frame (4l+1 rows: m = 0, then per m > 0 four rows by component, then part). The rows of each order m go
// to every block that reads degree d: block j ([E, s, s * W_j], s = 1 for m = 0 else 2, W_j its degrees' channels
// side by side) gets row q of order m at [e, q / s, (q % s) * W_j + offset of d + c]. One pass replaces a gather of E
// rows, the rotation and one concatenation per block.
static int64_t first_row(int64_t m) { return m == 0 ? 0 : 1 + 4 * (m - 1); }  // of order m in D_in

struct Blocks {  // the blocks' layout, checked: per block its width, and per degree the (block, column offset) pairs
  std::vector<int64_t> width, dim;  // dim: 2l+1 per degree, read in the loops without a tensor's size()
  std::vector<std::vector<std::pair<int64_t, int64_t>>> readers;
  Blocks(const std::vector<torch::Tensor>& Ds, const std::vector<int64_t>& channels, const std::vector<int64_t>& m,
         const std::vector<std::vector<int64_t>>& degrees)
      : readers(Ds.size()) {
    TORCH_CHECK(m.size() == degrees.size(), "one order m per block");
    for (const auto& D : Ds) dim.push_back(D.size(2));
    for (size_t j = 0; j < m.size(); ++j) {
      int64_t w = 0;
      for (int64_t d : degrees[j]) {
        TORCH_CHECK(d >= 0 && d < (int64_t)Ds.size(), "block ", j, " reads degree position ", d, " of ", Ds.size());
        TORCH_CHECK(m[j] >= 0 && 4 * m[j] < Ds[d].size(1), "block ", j, ": order ", m[j], " exceeds degree position ",
                    d, " (", Ds[d].size(1), " rows)");
        readers[d].emplace_back(j, w);
        w += channels[d];
      }
      width.push_back(w);
    }
  }
};

static void check_frames(const std::vector<torch::Tensor>& Ds, int64_t E) {
  for (const auto& D : Ds)
    TORCH_CHECK(D.scalar_type() == torch::kFloat && D.dim() == 3 && D.is_contiguous() && D.size(0) == E &&
                    D.size(1) == 2 * D.size(2) - 1,
                "D must be contiguous float32 [E, 4l+1, 2l+1] with E = ", E, ", got ", D.sizes());
}

template <typename T>
static std::vector<T*> pointers(const std::vector<torch::Tensor>& ts) {  // raw data, looked up once
  std::vector<T*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<float>());
  return out;
}

// f(e, d, D_e, row of D_e for q = 0 of block j, j, column offset, s, W) for every edge (in parallel), every degree d
// and every block j that reads d
template <typename F>
static void for_each_read(const Blocks& layout, const std::vector<torch::Tensor>& Ds, const std::vector<int64_t>& m,
                          F&& f) {
  const auto Dp = pointers<const float>(Ds);
  at::parallel_for(0, Ds[0].size(0), 64, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      for (size_t d = 0; d < Ds.size(); ++d) {
        const int64_t B = layout.dim[d];
        const float* De = Dp[d] + e * (2 * B - 1) * B;
        for (const auto& [j, offset] : layout.readers[d]) {
          const int64_t s = m[j] ? 2 : 1;
          f(e, d, De + first_row(m[j]) * B, j, offset, s, layout.width[j]);
        }
      }
  });
}

std::vector<torch::Tensor> frame_rotate_into_blocks(std::vector<torch::Tensor> Ds, std::vector<torch::Tensor> xs,
                                                    torch::Tensor index, std::vector<int64_t> m,
                                                    std::vector<std::vector<int64_t>> degrees) {
  TORCH_CHECK(Ds.size() == xs.size() && !Ds.empty(), "one D [E, 4l+1, 2l+1] per x [N, 2l+1, C]");
  const int64_t E = Ds[0].size(0);
  check_frames(Ds, E);
  std::vector<int64_t> channels;
  for (size_t d = 0; d < Ds.size(); ++d) {
    TORCH_CHECK(xs[d].scalar_type() == torch::kFloat && xs[d].dim() == 3 && xs[d].is_contiguous() &&
                    xs[d].size(1) == Ds[d].size(2) && xs[d].size(0) == xs[0].size(0),
                "x must be contiguous float32 [N, 2l+1, C] matching D ", Ds[d].sizes(), ", got ", xs[d].sizes());
    channels.push_back(xs[d].size(2));
  }
  TORCH_CHECK(index.numel() == E || (index.numel() == 0 && xs[0].size(0) == E),
              "one source row per edge (", E, "), or no index and one row of x per edge; got ", index.numel(),
              " indices and ", xs[0].size(0), " rows");
  const int64_t* src = checked_index(index, xs[0].size(0), "index");  // nullptr: row e of x
  const Blocks layout(Ds, channels, m, degrees);
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < m.size(); ++j) {
    const int64_t s = m[j] ? 2 : 1;
    out.push_back(torch::empty({E, s, s * layout.width[j]}, xs[0].options()));
  }
  const auto xp = pointers<const float>(xs);
  const auto yp = pointers<float>(out);
  for_each_read(layout, Ds, m, [&](int64_t e, size_t d, const float* D, int64_t j, int64_t offset, int64_t s,
                                   int64_t W) {
    const int64_t B = layout.dim[d], C = channels[d];
    const float* xe = xp[d] + (src ? src[e] : e) * B * C;
    float* row = yp[j] + e * s * s * W + offset;
    for (int64_t q = 0; q < s * s; ++q) rotate_one(D + q * B, xe, row + q * W, 1, B, C, B, 1);  // a row of D times x
  });
  return out;
}

// The input gradient of frame_rotate_into_blocks, rows first like x: per edge, gx_d[e, b, c] = sum over the blocks j
// that read d and their rows q of D_d[e, row of q, b] g_j[e, row q at d's columns, c]; with `index` (the source row of
// each edge) summed into the `rows` source rows instead, each row by one thread over its edges in ascending order (the
// order index_add_ adds them): no per-edge buffer, zero fill or scatter.
std::vector<torch::Tensor> frame_rotate_from_blocks(std::vector<torch::Tensor> Ds, std::vector<torch::Tensor> grads,
                                                    std::vector<int64_t> channels, std::vector<int64_t> m,
                                                    std::vector<std::vector<int64_t>> degrees, torch::Tensor index,
                                                    int64_t rows) {
  TORCH_CHECK(Ds.size() == channels.size() && grads.size() == m.size() && !Ds.empty(),
              "one D per degree, one gradient per block");
  const int64_t E = Ds[0].size(0);
  check_frames(Ds, E);
  const Blocks layout(Ds, channels, m, degrees);
  for (size_t j = 0; j < m.size(); ++j) {
    const int64_t s = m[j] ? 2 : 1;
    TORCH_CHECK(grads[j].scalar_type() == torch::kFloat && grads[j].is_contiguous() && grads[j].dim() == 3 &&
                    grads[j].size(0) == E && grads[j].size(1) == s && grads[j].size(2) == s * layout.width[j],
                "block ", j, ": gradient must be contiguous float32 [", E, ", ", s, ", ", s * layout.width[j],
                "], got ", grads[j].sizes());
  }
  const bool per_edge = index.numel() == 0 && rows == E;  // edge e adds to row e
  TORCH_CHECK(per_edge || index.numel() == E, "one source row per edge (", E,
              "), or no index and one row per edge; got ", index.numel(), " indices for ", rows, " rows");
  const int64_t* src = per_edge ? nullptr : checked_index(index, rows, "index");  // nullptr also when E = 0
  std::vector<int64_t> start(rows + 1, 0), order(E);  // the edges of each row: a counting sort by source
  if (src) {
    for (int64_t e = 0; e < E; ++e) ++start[src[e] + 1];
    for (int64_t n = 0; n < rows; ++n) start[n + 1] += start[n];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < E; ++e) order[next[src[e]]++] = e;
  }
  std::vector<torch::Tensor> gx;
  for (size_t d = 0; d < Ds.size(); ++d)
    gx.push_back(torch::empty({rows, layout.dim[d], channels[d]}, Ds[d].options()));
  const auto gp = pointers<const float>(grads);
  const auto xp = pointers<float>(gx);
  const auto Dp = pointers<const float>(Ds);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (size_t d = 0; d < Ds.size(); ++d) {
        const int64_t size = layout.dim[d] * channels[d];  // [2l+1, C] of row n
        std::fill_n(xp[d] + n * size, size, 0.0f);
      }
      const int64_t e0 = per_edge ? n : start[n], e1 = per_edge ? n + 1 : start[n + 1];
      for (int64_t k = e0; k < e1; ++k) {
        const int64_t e = per_edge ? k : order[k];
        for (size_t d = 0; d < Ds.size(); ++d) {
          const int64_t B = layout.dim[d], C = channels[d];
          const float* De = Dp[d] + e * (2 * B - 1) * B;
          float* acc = xp[d] + n * B * C;  // [B, C]
          for (const auto& [j, offset] : layout.readers[d]) {
            const int64_t s = m[j] ? 2 : 1, W = layout.width[j];
            const float* D = De + first_row(m[j]) * B;
            const float* g = gp[j] + e * s * s * W + offset;
            for (int64_t q = 0; q < s * s; ++q)
              for (int64_t b = 0; b < B; ++b) {  // acc[b, :] += D[q, b] g[q, :]
                const float coef = D[q * B + b];
                int64_t c = 0;
                for (; c + VW <= C; c += VW)
                  vstore(acc + b * C + c, vfma(vset1(coef), vload(g + q * W + c), vload(acc + b * C + c)));
                if (c < C) {
                  const int64_t n = C - c;
                  const vec sum = vfma(vset1(coef), vload_first(g + q * W + c, n), vload_first(acc + b * C + c, n));
                  vstore_first(acc + b * C + c, sum, n);
                }
              }
          }
        }
      }
    }
  });
  return gx;
}

// same_bits: whether two CPU tensors hold the same bytes, for caches keyed on a tensor's values (SO2Plan.fold): bit
// for bit, so equal NaNs match and -0 differs from 0 (a cache then only rebuilds). memcmp over chunks on all threads;
// torch.equal compares element by element on one (0.9 MB: 54 us against about 10 on 2 cores).
bool same_bits(torch::Tensor a, torch::Tensor b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.is_contiguous() && b.is_contiguous(),
              "same_bits compares contiguous CPU tensors");
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const auto *pa = static_cast<const char*>(a.data_ptr()), *pb = static_cast<const char*>(b.data_ptr());
  std::atomic<bool> same{true};
  at::parallel_for(0, a.numel() * a.element_size(), 1 << 16, [&](int64_t begin, int64_t end) {
    if (same.load(std::memory_order_relaxed) && std::memcmp(pa + begin, pb + begin, end - begin) != 0) same = false;
  });
  return same;
}

// The way back out of the edge frames for attention (nbs/04b_so2_conv.ipynb): the outputs of the SO(2) products, per
// m-block j y_j [E, s, W_j], are parts of each output degree's rows in the edge frame, y_d [2l+1, C_d] per edge: part
// p puts y_j[e, comp, offset_p + c] into row (m_p = 0: 0, else 2 m_p - 1 + comp) of degree d_p, parts of one row
// added, rows no part reaches zero. Row inverse[e] of the result is D_d[e]^T y_d of every degree, component a of
// channel c at column columns_d[c] + a. One pass instead of splitting the blocks by degree, adding, concatenating the
// orders and rotating.
struct BlockParts {  // the parts, checked: per degree its parts (block, order m, column offset)
  std::vector<std::vector<std::tuple<int64_t, int64_t, int64_t>>> of_degree;
  std::vector<const int64_t*> columns;
  std::vector<int64_t> n, C;  // per degree 2l+1 and its channels, read in the loops without a tensor's size()
  int64_t most = 1;  // the largest (2l+1) C_d: the size of one degree's rows
  BlockParts(const std::vector<torch::Tensor>& Ds, const std::vector<int64_t>& widths,
             const std::vector<int64_t>& degree, const std::vector<int64_t>& m, const std::vector<int64_t>& block,
             const std::vector<int64_t>& offset, const std::vector<torch::Tensor>& cols, int64_t width)
      : of_degree(Ds.size()) {
    TORCH_CHECK(degree.size() == m.size() && m.size() == block.size() && block.size() == offset.size(),
                "one degree, order, block and offset per part");
    TORCH_CHECK(cols.size() == Ds.size(), "one set of columns per degree");
    for (size_t d = 0; d < Ds.size(); ++d) {
      const int64_t n = Ds[d].size(2);
      TORCH_CHECK(Ds[d].scalar_type() == torch::kFloat && Ds[d].dim() == 3 && Ds[d].is_contiguous() &&
                      Ds[d].size(1) == n && Ds[d].size(0) == Ds[0].size(0) && n % 2 == 1,
                  "D must be contiguous float32 [E, 2l+1, 2l+1], got ", Ds[d].sizes());
      columns.push_back(checked_index(cols[d], width - n + 1, "columns"));
      most = std::max(most, n * cols[d].numel());
      this->n.push_back(n), C.push_back(cols[d].numel());
    }
    for (size_t p = 0; p < degree.size(); ++p) {
      TORCH_CHECK(degree[p] >= 0 && degree[p] < static_cast<int64_t>(Ds.size()) && block[p] >= 0 &&
                      block[p] < static_cast<int64_t>(widths.size()),
                  "part ", p, ": degree or block out of range");
      const int64_t n = Ds[degree[p]].size(2), C = cols[degree[p]].numel();
      TORCH_CHECK(m[p] >= 0 && 2 * m[p] < n, "part ", p, ": order ", m[p], " exceeds its degree's ", n, " rows");
      TORCH_CHECK(offset[p] >= 0 && offset[p] + C <= widths[block[p]], "part ", p, ": ", C, " channels from column ",
                  offset[p], " exceed its block's ", widths[block[p]]);
      of_degree[degree[p]].emplace_back(block[p], m[p], offset[p]);
    }
    // every degree's rows [2l+1, C_d] side by side (from first[d]) hold a row's `width` values once: column t of the
    // row is value at[t] of them. A row moves in one loop over its columns in order, not C_d strided loops per degree
    // (QM9's 512 columns: 1.2-1.6x faster passes, Zen 5)
    int64_t values = 0;
    for (size_t d = 0; d < Ds.size(); ++d) first.push_back(values), values += n[d] * C[d];
    TORCH_CHECK(values == width, "the degrees' ", values, " values per row must fill its ", width, " columns");
    at.assign(width, -1);
    for (size_t d = 0; d < Ds.size(); ++d)
      for (int64_t c = 0; c < C[d]; ++c)
        for (int64_t a = 0; a < n[d]; ++a) {
          const int64_t t = columns[d][c] + a;
          TORCH_CHECK(at[t] < 0, "column ", t, " is written twice: the columns must cover the row once");
          at[t] = first[d] + a * C[d] + c;
        }
  }
  std::vector<int64_t> first, at;  // per degree where its rows [2l+1, C_d] start; per column the value it holds
};

static int64_t row_of(int64_t m, int64_t comp) { return m == 0 ? 0 : 2 * m - 1 + comp; }  // in D_out's rows by m

torch::Tensor frame_rotate_blocks_to_columns(std::vector<torch::Tensor> Ds, std::vector<torch::Tensor> ys,
                                             std::vector<int64_t> degree, std::vector<int64_t> m,
                                             std::vector<int64_t> block, std::vector<int64_t> offset,
                                             std::vector<torch::Tensor> columns, torch::Tensor inverse, int64_t width) {
  TORCH_CHECK(!Ds.empty(), "at least one degree");
  const int64_t E = Ds[0].size(0);
  std::vector<int64_t> widths;
  for (const auto& y : ys) {
    TORCH_CHECK(y.scalar_type() == torch::kFloat && y.is_contiguous() && y.dim() == 3 && y.size(0) == E &&
                    (y.size(1) == 1 || y.size(1) == 2),
                "block outputs must be contiguous float32 [", E, ", 1 or 2, W], got ", y.sizes());
    widths.push_back(y.size(2));
  }
  const BlockParts parts(Ds, widths, degree, m, block, offset, columns, width);
  for (size_t p = 0; p < m.size(); ++p)
    TORCH_CHECK(ys[block[p]].size(1) == (m[p] ? 2 : 1), "part ", p, ": order ", m[p], " needs a block of ",
                m[p] ? 2 : 1, " rows");
  TORCH_CHECK(inverse.numel() == E, "one row per edge: ", inverse.numel(), " rows for ", E, " edges");
  const int64_t* rows = checked_index(inverse, E, "inverse");
  auto out = torch::empty({E, width}, Ds[0].options());
  const auto Dp = pointers<const float>(Ds);
  const auto yp = pointers<const float>(ys);
  float* op = out.data_ptr<float>();
  // edges in their order, rows written where they go: the reads (blocks, D) stream, only the writes jump
  at::parallel_for(0, E, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> y(parts.most), z(width);  // [2l+1, C] in the edge frame; every degree's rotated back
    for (int64_t e = begin; e < end; ++e) {
      for (size_t d = 0; d < Ds.size(); ++d) {
        const int64_t n = parts.n[d], C = parts.C[d];
        std::fill_n(y.data(), n * C, 0.0f);
        for (const auto& [j, mp, off] : parts.of_degree[d]) {
          const int64_t s = mp ? 2 : 1;
          for (int64_t comp = 0; comp < s; ++comp) {
            const float* src = yp[j] + (e * s + comp) * widths[j] + off;
            float* dst = y.data() + row_of(mp, comp) * C;
            for (int64_t c = 0; c < C; ++c) dst[c] += src[c];
          }
        }
        rotate_one(Dp[d] + e * n * n, y.data(), z.data() + parts.first[d], n, n, C, 1, n);  // D^T y
      }
      float* r = op + rows[e] * width;
      for (int64_t t = 0; t < width; ++t) r[t] = z[parts.at[t]];
    }
  });
  return out;
}

// Its gradient: per block j [E, s, W_j], each part's rows of D_d g_d for edge e = index[k], g_d gathered from the
// columns of row k; block columns no part reads get zeros.
std::vector<torch::Tensor> frame_rotate_columns_to_blocks(std::vector<torch::Tensor> Ds, torch::Tensor grad,
                                                          std::vector<int64_t> rows_of_blocks,
                                                          std::vector<int64_t> widths, std::vector<int64_t> degree,
                                                          std::vector<int64_t> m, std::vector<int64_t> block,
                                                          std::vector<int64_t> offset,
                                                          std::vector<torch::Tensor> columns, torch::Tensor index) {
  TORCH_CHECK(!Ds.empty() && rows_of_blocks.size() == widths.size(), "at least one degree; rows and width per block");
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && grad.is_contiguous() && grad.dim() == 2,
              "grad must be contiguous float32 [K, W]");
  const int64_t E = Ds[0].size(0), width = grad.size(1);
  const BlockParts parts(Ds, widths, degree, m, block, offset, columns, width);
  TORCH_CHECK(index.numel() == E && grad.size(0) == E, "one row of grad per edge: ", index.numel(), " indices and ",
              grad.size(0), " rows for ", E, " edges");
  const int64_t* edge = checked_index(index, E, "index");
  std::vector<int64_t> covered(widths.size(), 0);
  for (size_t p = 0; p < m.size(); ++p) covered[block[p]] += columns[degree[p]].numel();
  std::vector<torch::Tensor> gys;
  for (size_t j = 0; j < widths.size(); ++j) {
    const auto shape = std::vector<int64_t>{E, rows_of_blocks[j], widths[j]};
    gys.push_back(covered[j] == widths[j] ? torch::empty(shape, grad.options()) : torch::zeros(shape, grad.options()));
  }
  const auto Dp = pointers<const float>(Ds);
  const auto gp = pointers<float>(gys);
  const float* gr = grad.data_ptr<float>();
  at::parallel_for(0, E, 64, [&](int64_t begin, int64_t end) {  // rows in order: the reads stream, the writes jump
    std::vector<float> z(width), y(parts.most);  // every degree's [2l+1, C] from the row; rotated
    for (int64_t k = begin; k < end; ++k) {
      const int64_t e = edge[k];
      const float* r = gr + k * width;
      for (int64_t t = 0; t < width; ++t) z[parts.at[t]] = r[t];  // the row read in order, its values put in place
      for (size_t d = 0; d < Ds.size(); ++d) {
        const int64_t n = parts.n[d], C = parts.C[d];
        rotate_one(Dp[d] + e * n * n, z.data() + parts.first[d], y.data(), n, n, C, n, 1);  // D g
        for (const auto& [j, mp, off] : parts.of_degree[d]) {
          const int64_t s = mp ? 2 : 1;
          for (int64_t comp = 0; comp < s; ++comp)
            std::copy_n(y.data() + row_of(mp, comp) * C, C, gp[j] + (e * s + comp) * widths[j] + off);
        }
      }
    }
  });
  return gys;
}

std::string isa() { return kIsa; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa, "the vector ISA this build uses: 'avx512' or 'avx2'");
  m.def("vector_width", []() { return VW; }, "floats per vector register");
  m.def("variants", []() { return kVariants; }, "register tiles compiled for forward and grad_x");
  m.def("so2_forward", &so2_forward,
        "y = x W(h)^T per slot (h [P, K], theta [O, K, I], x [P, R, I], variant, o_tile, slot_chunk) -> [P, R, O]");
  m.def("so2_grad_x", &so2_grad_x,
        "dx = dy W(h) per slot (h [P, K], theta [O, K, I], gy [P, R, O], variant, o_tile, slot_chunk) -> [P, R, I]");
  m.def("so2_grad_w", &so2_grad_w, "dw (h [P, K], x [P, R, I], gy [P, R, O], slot_chunk, out) -> [O, I, K] (out)",
        py::arg("h"), py::arg("x"), py::arg("gy"), py::arg("slot_chunk"), py::arg("out") = py::none());
  m.def("so2_grad_h", &so2_grad_h,
        "dh per slot, or per edge with split (w [O, I, K], x [P, R, I], gy [P, R, O], split, o_block, out, accumulate)"
        " -> [P or 2P, K] (out, to which dh is added with accumulate)",
        py::arg("w"), py::arg("x"), py::arg("gy"), py::arg("split"), py::arg("o_block"), py::arg("out") = py::none(),
        py::arg("accumulate") = false);
  m.def("so2_forward_planned", &so2_forward_planned,
        "y = x W^T of one block: so2_forward on theta [O, K, I], or (transposed) so2_grad_x on theta [I, K, O] "
        "(h, theta, x, variant, tile, transposed) -> [P, R, O]");
  m.def("so2_forward_blocks", &so2_forward_blocks,
        "so2_forward_planned of every m-block (h [P, K], weight [n, K], xs, sizes O*I, plans (variant, tile, "
        "transposed) per block, kept thetas or []) -> (ys, thetas for backward, padded inputs)");
  m.def("so2_backward_blocks", &so2_backward_blocks,
        "grad_x, grad_h, grad_w of every m-block (h, weight, thetas, padded inputs, widths I, gys, sizes, plans "
        "(variant, tile, o_block, slot_chunk) per block, split, need_h, grad_w [n, K] or empty) -> (dxs..., dh)");
  m.def("frame_rotate_rows", &frame_rotate_rows,
        "row k: D[d_index[k]] x[x_index[k]] (or D^T); x and the result rows first (0), channels first (1) or in "
        "columns of a 2-D buffer (2) (D, x, transpose, d_index, x_index, x_layout, x_columns, out_layout, out, "
        "out_columns) -> [K, A, C], [K, C, A] or out");
  m.def("frame_rotate_blocks_to_columns", &frame_rotate_blocks_to_columns,
        "row inverse[e]: D_d[e]^T y_d of every degree d into its columns, y_d assembled from parts of the blocks' "
        "outputs (Ds [E, 2l+1, 2l+1], ys [E, s, W], part degree, m, block, offset, columns, inverse [E], width) -> "
        "[E, W]");
  m.def("frame_rotate_columns_to_blocks", &frame_rotate_columns_to_blocks,
        "its gradient (Ds, grad [K, W], rows and width per block, part degree, m, block, offset, columns, "
        "index [E]) -> per block [E, s, W]");
  m.def("same_bits", &same_bits, "whether two contiguous CPU tensors of one shape and dtype hold the same bytes");
  m.def("frame_rotate_into_blocks", &frame_rotate_into_blocks,
        "per block j: rows of order m[j] of D_d[e] x_d[index[e]] for its degrees side by side (Ds [E, 4l+1, 2l+1], "
        "xs [N, 2l+1, C], index [E], m, degrees) -> per block [E, s, s * W]");
  m.def("frame_rotate_from_blocks", &frame_rotate_from_blocks,
        "the input gradient of frame_rotate_into_blocks, per edge or summed into each edge's source row (Ds, grads, "
        "channels, m, degrees, index [E] or empty, rows) -> per degree [rows, 2l+1, C]");
}
