// CPU kernels of the model's small layers, one extension (one ~20 s build on first use instead of three):
//   1. edge frames (nbs/04a_so2.ipynb, op `edge_frames`),
//   2. the radial MLPs' hidden layers (nbs/04_conv.ipynb, op `radial_hidden`),
//   3. the norm nonlinearity (nbs/06_norm.ipynb, op `norm_nonlinearity`),
//   4. channel mixing, the TFN self-interaction (nbs/04_conv.ipynb, op `channel_mix`),
//   5. the fold of the last radial layers into SO(2) weights (nbs/04a_so2.ipynb, op `so2_fold`).
// Plain C++ loops, compiled for the CPU's vector instruction set (`load_extension`); float32 and float64.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

// f(D) with D = 2l+1 as a compile-time constant: loops over a vector's components unrolled
template <typename F>
void with_components(int64_t D, F&& f) {  // D = 2l+1 as a compile-time constant, l <= 4
  switch (D) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 9: f(std::integral_constant<int, 9>{}); break;
    default: TORCH_CHECK(false, "D = 2l+1 must be 1, 3, 5, 7 or 9 (degrees up to 4), not ", D);
  }
}

// The sum of N values (N a power of two) in pairs: log2 N levels of independent additions. A layer norm's statistics
// summed as `omp simd reduction` compile to one chain of additions over the vector's lanes (in order), which with one
// sqrt and division per row kept the FMA units idle for most of the radial MLP's time (AMD Zen 5: forward 1.4x,
// backward 1.3x with this and the statistics of a block's rows computed before their 1 / sqrt, in one vector).
template <typename T, int N>
inline T pairwise_sum(const T* v) {
  static_assert(N >= 2 && (N & (N - 1)) == 0, "a power of two");
  alignas(64) T a[N / 2];
#pragma omp simd
  for (int i = 0; i < N / 2; ++i) a[i] = v[i] + v[i + N / 2];
  for (int w = N / 4; w >= 1; w /= 2)
#pragma omp simd
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// ---------------------------------------------------------------------------------------------------------------------
// 1. The edge frames (nbs/04a_so2.ipynb, backend `native` of the op `edge_frames`): for every row r of the SO(2)
// layout and its edge e = slot_edges[r], the rotation R taking the edge direction to y (rows: x, y, z axes of the
// frame, as `edge_rotations`), its Wigner D matrices D_0 = 1, D_1 = R, D_l = C_l^T (D_{l-1} (x) R) C_l (`wigner_D`),
// per degree the rows the SO(2) path reads: D_in (rows by m, part-b rows repeated with signs) and D_out (rows by m).
// One pass per edge, without the ~30 batched torch operations (outer products, index copies) of the reference.
// No gradients: frames of positions that need them are built by torch. float32 and float64.

namespace frames {

// R (row-major 3 x 3) of edge vector p: rows ex, u, ex x u with u = p / |p| (y for |p| <= 1e-12)
template <typename T>
void edge_rotation(const T* p, T* R) {
  const T r = std::sqrt(p[0] * p[0] + p[1] * p[1] + p[2] * p[2]);
  T u[3] = {0, 1, 0};
  if (r > T(1e-12)) u[0] = p[0] / r, u[1] = p[1] / r, u[2] = p[2] / r;
  const bool near_x = std::abs(u[0]) > T(0.9);  // helper axis far from u: a well-conditioned frame
  T ex[3] = {near_x ? T(0) : T(1), 0, near_x ? T(1) : T(0)};  // the helper axis: z, or x
  const T dot = ex[0] * u[0] + ex[1] * u[1] + ex[2] * u[2];
  for (int i = 0; i < 3; ++i) ex[i] -= dot * u[i];
  const T n = std::sqrt(ex[0] * ex[0] + ex[1] * ex[1] + ex[2] * ex[2]);
  for (int i = 0; i < 3; ++i) ex[i] /= n;
  const T ez[3] = {ex[1] * u[2] - ex[2] * u[1], ex[2] * u[0] - ex[0] * u[2], ex[0] * u[1] - ex[1] * u[0]};
  for (int i = 0; i < 3; ++i) R[i] = ex[i], R[3 + i] = u[i], R[6 + i] = ez[i];
}

// D (n x n, n = 2l+1) from prev (m x m, m = 2l-1), R and C [3m, n]:
// D[i][j] = sum C[(a,c), i] prev[a][b] R[c][d] C[(b,d), j]
// Sizes known at compile time (M, N > 0: degrees 2-4) let the compiler unroll the short sums and interleave them; with
// runtime sizes each sum was a chain of dependent multiply-adds (~0.26 us per edge of degrees 0-2, now ~0.1).
template <typename T, int M = 0, int N = 0>
void next_wigner(const T* prev, const T* R, const T* C, int64_t m_, int64_t n_, T* U, T* Tm, T* D) {
  const int64_t m = M ? M : m_, n = N ? N : n_;
  for (int64_t b = 0; b < m; ++b)  // U[b][c][j] = sum_d R[c][d] C[(b,d), j]
    for (int c = 0; c < 3; ++c)
      for (int64_t j = 0; j < n; ++j) {
        T s = 0;
        for (int d = 0; d < 3; ++d) s += R[c * 3 + d] * C[(b * 3 + d) * n + j];
        U[(b * 3 + c) * n + j] = s;
      }
  for (int64_t a = 0; a < m; ++a)  // T[a][c][j] = sum_b prev[a][b] U[b][c][j]
    for (int64_t cj = 0; cj < 3 * n; ++cj) {
      T s = 0;
      for (int64_t b = 0; b < m; ++b) s += prev[a * m + b] * U[b * 3 * n + cj];
      Tm[a * 3 * n + cj] = s;
    }
  for (int64_t i = 0; i < n; ++i)  // D[i][j] = sum_{(a,c)} C[(a,c), i] T[a][c][j]
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t ac = 0; ac < 3 * m; ++ac) s += C[ac * n + i] * Tm[ac * n + j];
      D[i * n + j] = s;
    }
}

template <typename T>
void next_wigner_of_degree(int64_t l, const T* prev, const T* R, const T* C, T* U, T* Tm, T* D) {
  switch (l) {
    case 2: return next_wigner<T, 3, 5>(prev, R, C, 3, 5, U, Tm, D);
    case 3: return next_wigner<T, 5, 7>(prev, R, C, 5, 7, U, Tm, D);
    case 4: return next_wigner<T, 7, 9>(prev, R, C, 7, 9, U, Tm, D);
    default: return next_wigner<T>(prev, R, C, 2 * l - 1, 2 * l + 1, U, Tm, D);
  }
}


// (D_in per degree [E, 4l+1, 2l+1], D_out per degree [E, 2l+1, 2l+1]) in the rows of slot_edges.
// couplings: C_l [3(2l-1), 2l+1] for l = 2..max_degree; extended / signs / by_m: per degree, the rows of D_in (with
// their signs) and of D_out, as indices into D_l's rows.
std::vector<std::vector<torch::Tensor>> frame_matrices(torch::Tensor rel_pos, torch::Tensor slot_edges,
                                                       std::vector<torch::Tensor> couplings,
                                                       std::vector<torch::Tensor> extended,
                                                       std::vector<torch::Tensor> signs,
                                                       std::vector<torch::Tensor> by_m) {
  const int64_t L = static_cast<int64_t>(extended.size()) - 1, E = slot_edges.size(0);
  TORCH_CHECK(L >= 0 && signs.size() == extended.size() && by_m.size() == extended.size() &&
                  static_cast<int64_t>(couplings.size()) == std::max<int64_t>(L - 1, 0),
              "expected per degree 0..L the extended rows, their signs and the rows by m; couplings for l = 2..L");
  TORCH_CHECK(rel_pos.dim() == 2 && rel_pos.size(1) == 3 && rel_pos.is_contiguous() && rel_pos.device().is_cpu(),
              "expected contiguous CPU rel_pos [E, 3]");
  TORCH_CHECK(slot_edges.dim() == 1 && slot_edges.scalar_type() == at::kLong && slot_edges.is_contiguous(),
              "expected slot_edges [E] int64");
  const int64_t num_edges = rel_pos.size(0);
  for (int64_t l = 0; l <= L; ++l) {
    TORCH_CHECK(extended[l].numel() == 4 * l + 1 && by_m[l].numel() == 2 * l + 1 && signs[l].numel() == 4 * l + 1 &&
                    extended[l].scalar_type() == at::kLong && by_m[l].scalar_type() == at::kLong &&
                    signs[l].scalar_type() == rel_pos.scalar_type() && extended[l].is_contiguous() &&
                    by_m[l].is_contiguous() && signs[l].is_contiguous(),
                "degree ", l, ": expected 4l+1 extended rows and signs, 2l+1 rows by m");
    if (l >= 2)
      TORCH_CHECK(couplings[l - 2].sizes() == at::IntArrayRef({3 * (2 * l - 1), 2 * l + 1}) &&
                      couplings[l - 2].scalar_type() == rel_pos.scalar_type() && couplings[l - 2].is_contiguous(),
                  "coupling of degree ", l, " must be [3(2l-1), 2l+1] of rel_pos's dtype");
  }
  std::vector<torch::Tensor> D_in, D_out;
  for (int64_t l = 0; l <= L; ++l) {
    D_in.push_back(torch::empty({E, 4 * l + 1, 2 * l + 1}, rel_pos.options()));
    D_out.push_back(torch::empty({E, 2 * l + 1, 2 * l + 1}, rel_pos.options()));
  }
  const int64_t* edge = slot_edges.data_ptr<int64_t>();
  for (int64_t r = 0; r < E; ++r)
    TORCH_CHECK(edge[r] >= 0 && edge[r] < num_edges, "slot_edges holds ", edge[r], ", not an edge of ", num_edges);
  AT_DISPATCH_FLOATING_TYPES(rel_pos.scalar_type(), "frame_matrices", [&] {
    using T = scalar_t;
    const T* pos = rel_pos.data_ptr<T>();
    const int64_t n_max = 2 * L + 1;
    std::vector<const T*> C, sg;  // raw pointers per degree, looked up once
    std::vector<const int64_t*> ext, bm;
    std::vector<T*> din, dout;
    for (int64_t l = 0; l <= L; ++l) {
      C.push_back(l >= 2 ? couplings[l - 2].data_ptr<T>() : nullptr), sg.push_back(signs[l].data_ptr<T>());
      ext.push_back(extended[l].data_ptr<int64_t>()), bm.push_back(by_m[l].data_ptr<int64_t>());
      din.push_back(D_in[l].data_ptr<T>()), dout.push_back(D_out[l].data_ptr<T>());
    }
    at::parallel_for(0, E, 64, [&](int64_t r0, int64_t r1) {
      std::vector<T> Ds(2 * n_max * n_max), U(3 * n_max * n_max), Tm(3 * n_max * n_max);
      for (int64_t r = r0; r < r1; ++r) {
        T R[9];
        edge_rotation(pos + edge[r] * 3, R);
        T *prev = Ds.data(), *cur = Ds.data() + n_max * n_max;
        for (int64_t l = 0; l <= L; ++l) {
          const int64_t n = 2 * l + 1;
          if (l == 0) cur[0] = 1;
          if (l == 1) std::copy(R, R + 9, cur);
          if (l >= 2) next_wigner_of_degree<T>(l, prev, R, C[l], U.data(), Tm.data(), cur);
          T *in = din[l] + r * (2 * n - 1) * n, *out = dout[l] + r * n * n;
          for (int64_t k = 0; k < 2 * n - 1; ++k)
            for (int64_t j = 0; j < n; ++j) in[k * n + j] = sg[l][k] * cur[ext[l][k] * n + j];
          for (int64_t k = 0; k < n; ++k)
            for (int64_t j = 0; j < n; ++j) out[k * n + j] = cur[bm[l][k] * n + j];
          std::swap(prev, cur);
        }
      }
    });
  });
  return {D_in, D_out};
}

// The slots of the SO(2) path (EdgeFrames): each edge j -> i paired with a reverse edge i -> j whose invariants are
// equal (bit for bit; the k-th copy of a duplicated edge meets the k-th reverse copy), pairs in the order of the
// reverse edges by (unordered node pair, copy); then the lone edges and the zero-length edges, each in edge order.
// Returns first [P] (the edge whose invariants feed a slot), second [pairs] (its partner), slot_edges [E] (the edge of
// each slot row: a pair's two edges, then lone, then zero-length), position [E] (the row of each edge) and the numbers
// of pairs and zero-length slots: the sorts, searches and masks of the torch version in one pass.
template <typename T>
bool same_row(const T* a, const T* b, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (!(a[k] == b[k])) return false;  // NaN is never equal, as torch's ==
  return true;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t> slot_layout(
    torch::Tensor src, torch::Tensor dst, torch::Tensor rel_pos, torch::Tensor invariants, int64_t num_nodes) {
  const int64_t E = src.numel();
  TORCH_CHECK(src.scalar_type() == at::kLong && dst.scalar_type() == at::kLong && src.is_contiguous() &&
                  dst.is_contiguous() && dst.numel() == E && src.device().is_cpu(),
              "expected contiguous int64 CPU src [E] and dst [E]");
  TORCH_CHECK(rel_pos.dim() == 2 && rel_pos.size(0) == E && rel_pos.size(1) == 3 && rel_pos.is_contiguous() &&
                  invariants.dim() == 2 && invariants.size(0) == E && invariants.is_contiguous() &&
                  invariants.scalar_type() == rel_pos.scalar_type(),
              "expected contiguous rel_pos [E, 3] and invariants [E, F] of one dtype");
  const int64_t *s = src.data_ptr<int64_t>(), *d = dst.data_ptr<int64_t>();
  bool inside = true;
  for (int64_t e = 0; e < E; ++e) inside &= s[e] >= 0 && s[e] < num_nodes && d[e] >= 0 && d[e] < num_nodes;
  TORCH_CHECK(inside, "src and dst must be nodes in [0, ", num_nodes, ")");
  std::vector<char> zero(E), paired(E, 0);
  std::vector<std::pair<int64_t, int64_t>> fwd, bwd;  // (unordered node pair, edge), then sorted
  AT_DISPATCH_FLOATING_TYPES(rel_pos.scalar_type(), "slot_layout", [&] {
    const scalar_t* p = rel_pos.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      const scalar_t x = p[3 * e], y = p[3 * e + 1], z = p[3 * e + 2];
      zero[e] = std::sqrt(x * x + y * y + z * z) <= scalar_t(1e-12);  // as edge_rotations finds them
    }
  });
  for (int64_t e = 0; e < E; ++e) {
    if (zero[e] || s[e] == d[e]) continue;
    const int64_t key = std::min(s[e], d[e]) * num_nodes + std::max(s[e], d[e]);
    (s[e] < d[e] ? fwd : bwd).emplace_back(key, e);
  }
  std::sort(fwd.begin(), fwd.end());  // by key, then edge id: copies of one edge in edge order
  std::sort(bwd.begin(), bwd.end());
  std::vector<int64_t> a, b;
  size_t i = 0, run = 0;  // i: where the forward edges of the key start; run: where the reverse edges of the key start
  for (size_t k = 0; k < bwd.size(); ++k) {
    const int64_t key = bwd[k].first;
    if (k == 0 || key != bwd[k - 1].first) run = k;
    while (i < fwd.size() && fwd[i].first < key) ++i;
    const size_t j = i + (k - run);  // the forward copy with the same rank among the key's edges
    if (j < fwd.size() && fwd[j].first == key) a.push_back(fwd[j].second), b.push_back(bwd[k].second);
  }
  std::vector<int64_t> first, second, rows;
  AT_DISPATCH_FLOATING_TYPES(invariants.scalar_type(), "slot_layout", [&] {
    const scalar_t* v = invariants.data_ptr<scalar_t>();
    const int64_t F = invariants.size(1);
    for (size_t k = 0; k < a.size(); ++k)
      if (same_row(v + a[k] * F, v + b[k] * F, F)) {
        first.push_back(a[k]), second.push_back(b[k]), rows.push_back(a[k]), rows.push_back(b[k]);
        paired[a[k]] = paired[b[k]] = 1;
      }
  });
  const int64_t pairs = static_cast<int64_t>(second.size());
  for (int64_t e = 0; e < E; ++e)
    if (!paired[e] && !zero[e]) first.push_back(e), rows.push_back(e);
  int64_t zeros = 0;
  for (int64_t e = 0; e < E; ++e)
    if (zero[e]) first.push_back(e), rows.push_back(e), ++zeros;
  auto as_tensor = [](const std::vector<int64_t>& v) {
    auto t = torch::empty({static_cast<int64_t>(v.size())}, torch::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  auto position = torch::empty({E}, torch::kLong);
  int64_t* pos = position.data_ptr<int64_t>();
  for (int64_t r = 0; r < E; ++r) pos[rows[r]] = r;
  return {as_tensor(first), as_tensor(second), as_tensor(rows), position, pairs, zeros};
}

}  // namespace frames

// ---------------------------------------------------------------------------------------------------------------------
// 2. The radial MLPs' hidden layers (nbs/04_conv.ipynb, backend `native` of the op `radial_hidden`). Per
// row x [K] of the edge invariants:
//   y1 = LN1(W1 x + b1),  a1 = relu(y1),  y2 = LN2(W2 a1 + b2),  h = relu(y2)
// where LN is a layer norm over the M hidden units with a learned scale and shift (or nothing, without layer norms).
// One pass per row with every intermediate in L1; backward recomputes them from x, and sums the parameter gradients
// per thread, then over threads in a fixed order. torch spends ~20 us per operation on these small shapes (1,209 rows
// of 32 units): the MLP's ~12 operations and their backward cost more than its arithmetic. float32 and float64.

namespace radial {


constexpr int ROWS = 8;  // rows per block: each weight vector loaded once for all of them, 2 x ROWS accumulators

// u[r] = W x[r] + b for the rows of a block, Wt [J, MM] (row j: the weights of input j for all MM outputs)
template <typename T, int MM>
inline void affine(const T* Wt, const T* b, const T* x, int64_t x_stride, int64_t J, int nr, T (*u)[MM]) {
  for (int r = 0; r < ROWS; ++r)
#pragma omp simd
    for (int m = 0; m < MM; ++m) u[r][m] = b[m];
  for (int64_t j = 0; j < J; ++j) {
    const T* w = Wt + j * MM;
    for (int r = 0; r < ROWS; ++r) {
      const T xj = r < nr ? x[r * x_stride + j] : T(0);
#pragma omp simd
      for (int m = 0; m < MM; ++m) u[r][m] += w[m] * xj;
    }
  }
}

// One layer for a block of rows: z (normalized pre-activation; without norms the pre-activation itself) and
// a = relu(g z + s) (or relu(z)); rstd[r] = 1 / std of row r
template <typename T, int MM>
inline void layer(const T* Wt, const T* b, const T* g, const T* s, bool norm, T eps, const T* x, int64_t x_stride,
                  int64_t J, int nr, T (*z)[MM], T (*a)[MM], T* rstd) {
  affine<T, MM>(Wt, b, x, x_stride, J, nr, z);
  T mean[ROWS] = {}, var[ROWS] = {};
  if (norm) {  // the statistics of all rows first, then 1 / sqrt for all of them in one vector (see pairwise_sum)
    for (int r = 0; r < ROWS; ++r) mean[r] = pairwise_sum<T, MM>(z[r]) / MM;
    for (int r = 0; r < ROWS; ++r) {
      alignas(64) T d2[MM];
#pragma omp simd
      for (int m = 0; m < MM; ++m) d2[m] = (z[r][m] - mean[r]) * (z[r][m] - mean[r]);
      var[r] = pairwise_sum<T, MM>(d2) / MM;
    }
  }
#pragma omp simd
  for (int r = 0; r < ROWS; ++r) rstd[r] = norm ? T(1) / std::sqrt(var[r] + eps) : T(1);
  for (int r = 0; r < ROWS; ++r) {
    if (norm) {
#pragma omp simd
      for (int m = 0; m < MM; ++m) z[r][m] = (z[r][m] - mean[r]) * rstd[r];
    }
#pragma omp simd
    for (int m = 0; m < MM; ++m) {
      const T y = norm ? g[m] * z[r][m] + s[m] : z[r][m];
      a[r][m] = y > 0 ? y : T(0);
    }
  }
}

// Backward of one layer for one row: from da (gradient of its output a) to du (gradient of its pre-activation),
// adding the scale and shift gradients of its norm to dg, ds.
template <typename T, int MM>
inline void layer_backward(const T* g, const T* s, bool norm, T rstd, const T* z, const T* da, T* du, T* dg, T* ds) {
  if (!norm) {
#pragma omp simd
    for (int m = 0; m < MM; ++m) du[m] = z[m] > 0 ? da[m] : T(0);
    return;
  }
  alignas(64) T dzz[MM];
#pragma omp simd
  for (int m = 0; m < MM; ++m) {
    const T dy = g[m] * z[m] + s[m] > 0 ? da[m] : T(0);
    dg[m] += dy * z[m], ds[m] += dy;
    du[m] = dy * g[m];  // dz for now
    dzz[m] = du[m] * z[m];
  }
  const T mean_dz = pairwise_sum<T, MM>(du) / MM, mean_dzz = pairwise_sum<T, MM>(dzz) / MM;
#pragma omp simd
  for (int m = 0; m < MM; ++m) du[m] = rstd * (du[m] - mean_dz - z[m] * mean_dzz);
}

template <typename T>
struct Mlp {  // raw parameters: W1 [M, K], W1t [K, M], W2 [M, M], W2t [M, M] (transposed: outputs contiguous)
  const T *W1, *W1t, *b1, *g1, *s1, *W2, *W2t, *b2, *g2, *s2;
  int64_t K, M;
  bool norm;
  T eps;
};

// The hidden layers of rows p0..p0+nr into h (row stride MM)
template <typename T, int MM>
void forward_block(const Mlp<T>& q, const T* x, int nr, T* h) {
  alignas(64) T z[ROWS][MM], a[ROWS][MM], rstd[ROWS];
  layer<T, MM>(q.W1t, q.b1, q.g1, q.s1, q.norm, q.eps, x, q.K, q.K, nr, z, a, rstd);
  layer<T, MM>(q.W2t, q.b2, q.g2, q.s2, q.norm, q.eps, &a[0][0], MM, MM, ROWS, z, a, rstd);
  for (int r = 0; r < nr; ++r)
#pragma omp simd
    for (int m = 0; m < MM; ++m) h[r * MM + m] = a[r][m];
}

// Backward of rows p0..p0+nr from dh (row stride MM): adds to the parameter gradients at dW1 (laid out as dW1^T
// [K, MM], db1, dg1, ds1, dW2, db2, dg2, ds2) and writes dx (row stride K) when gx is not null.
template <typename T, int MM>
void backward_block(const Mlp<T>& q, const T* x, int nr, const T* gh, T* dW1, T* gx) {
  const int64_t K = q.K;
  T *db1 = dW1 + MM * K, *dg1 = db1 + MM, *ds1 = dg1 + MM, *dW2 = ds1 + MM, *db2 = dW2 + MM * MM, *dg2 = db2 + MM;
  T* ds2 = dg2 + MM;
  alignas(64) T z1[ROWS][MM], a1[ROWS][MM], z2[ROWS][MM], h[ROWS][MM], du[ROWS][MM], da[ROWS][MM];
  T r1[ROWS], r2[ROWS];
  layer<T, MM>(q.W1t, q.b1, q.g1, q.s1, q.norm, q.eps, x, K, K, nr, z1, a1, r1);
  layer<T, MM>(q.W2t, q.b2, q.g2, q.s2, q.norm, q.eps, &a1[0][0], MM, MM, ROWS, z2, h, r2);
  for (int r = 0; r < ROWS; ++r) {
    alignas(64) T g[MM];
#pragma omp simd
    for (int m = 0; m < MM; ++m) g[m] = r < nr ? gh[r * MM + m] : T(0);  // rows past the end: no gradient
    layer_backward<T, MM>(q.g2, q.s2, q.norm, r2[r], z2[r], g, du[r], dg2, ds2);
  }
  for (int r = 0; r < ROWS; ++r)
#pragma omp simd
    for (int j = 0; j < MM; ++j) da[r][j] = 0;
  for (int m = 0; m < MM; ++m) {  // dW2 += du a1^T, da = W2^T du: each row of W2 read once for the block
    alignas(64) T acc[MM];
    const T* w = q.W2 + m * MM;
#pragma omp simd
    for (int j = 0; j < MM; ++j) acc[j] = 0;
    T bias = 0;
    for (int r = 0; r < ROWS; ++r) {
      const T d = du[r][m];
      bias += d;
#pragma omp simd
      for (int j = 0; j < MM; ++j) acc[j] += d * a1[r][j], da[r][j] += w[j] * d;
    }
    db2[m] += bias;
#pragma omp simd
    for (int j = 0; j < MM; ++j) dW2[m * MM + j] += acc[j];
  }
  for (int r = 0; r < ROWS; ++r) layer_backward<T, MM>(q.g1, q.s1, q.norm, r1[r], z1[r], da[r], du[r], dg1, ds1);
  for (int r = 0; r < nr; ++r) {  // dW1 += du x^T, kept transposed ([K, MM]: vectors over m)
#pragma omp simd
    for (int m = 0; m < MM; ++m) db1[m] += du[r][m];
    for (int64_t k = 0; k < K; ++k) {
      const T xk = x[r * K + k];
#pragma omp simd
      for (int m = 0; m < MM; ++m) dW1[k * MM + m] += du[r][m] * xk;
    }
  }
  if (gx == nullptr) return;
  for (int r = 0; r < nr; ++r)  // dx = W1^T du
    for (int64_t k = 0; k < K; ++k) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int m = 0; m < MM; ++m) acc += q.W1t[k * MM + m] * du[r][m];
      gx[r * K + k] = acc;
    }
}

// f.template operator()<MM>() for the supported widths M
template <typename F>
void with_width(int64_t M, F&& f) {
  switch (M) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    default: TORCH_CHECK(false, "the C++ radial MLP handles 16, 32 or 64 hidden units, not ", M);
  }
}

template <typename T>
Mlp<T> mlp_of(const std::vector<torch::Tensor>& p, bool norm, double eps) {
  return {p[0].data_ptr<T>(), p[1].data_ptr<T>(), p[2].data_ptr<T>(), p[3].data_ptr<T>(), p[4].data_ptr<T>(),
          p[5].data_ptr<T>(), p[6].data_ptr<T>(), p[7].data_ptr<T>(), p[8].data_ptr<T>(), p[9].data_ptr<T>(),
          p[1].size(0), p[0].size(0), norm, T(eps)};
}

void check(const torch::Tensor& x, const std::vector<torch::Tensor>& p) {
  TORCH_CHECK(p.size() == 10, "expected W1, W1t, b1, g1, s1, W2, W2t, b2, g2, s2");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "expected contiguous CPU rows x [P, K]");
  const int64_t M = p[0].size(0), K = x.size(1);
  const std::vector<std::vector<int64_t>> shapes = {{M, K}, {K, M}, {M}, {M}, {M}, {M, M}, {M, M}, {M}, {M}, {M}};
  for (size_t i = 0; i < p.size(); ++i)
    TORCH_CHECK(p[i].sizes() == at::IntArrayRef(shapes[i]) && p[i].is_contiguous() &&
                    p[i].scalar_type() == x.scalar_type(),
                "parameter ", i, " must be contiguous, of the rows' dtype and shape ", at::IntArrayRef(shapes[i]));
}


// The parameters with W1 and W2 transposed beside them (row j: one input's weights for all outputs), as the blocks
// read them: made here rather than by two Python calls per pass (~10 us of dispatch each, for 1-16 KB).
std::vector<torch::Tensor> with_transposes(const std::vector<torch::Tensor>& p) {
  TORCH_CHECK(p.size() == 8, "expected W1, b1, g1, s1, W2, b2, g2, s2");
  TORCH_CHECK(p[0].dim() == 2 && p[4].dim() == 2, "W1 and W2 must be matrices");
  return {p[0], p[0].t().contiguous(), p[1], p[2], p[3], p[4], p[4].t().contiguous(), p[5], p[6], p[7]};
}

// h [P, M] from x [P, K] and the parameters (W1, b1, g1, s1, W2, b2, g2, s2; g and s unused without norms)
torch::Tensor radial_hidden_forward(torch::Tensor x, std::vector<torch::Tensor> weights, bool norm, double eps) {
  const auto params = with_transposes(weights);
  check(x, params);
  const int64_t P = x.size(0), M = params[0].size(0);
  with_width(M, [](auto) {});  // 16, 32 or 64 hidden units, else a clear error
  auto h = torch::empty({P, M}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "radial_hidden_forward", [&] {
    using T = scalar_t;
    const Mlp<T> q = mlp_of<T>(params, norm, eps);
    const T* xp = x.data_ptr<T>();
    T* hp = h.data_ptr<T>();
    const int64_t blocks = (P + ROWS - 1) / ROWS;
    with_width(M, [&](auto width) {
      constexpr int MM = decltype(width)::value;
      at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t p = b * ROWS;
          forward_block<T, MM>(q, xp + p * q.K, int(std::min<int64_t>(ROWS, P - p)), hp + p * MM);
        }
      });
    });
  });
  return h;
}

// (dx [P, K] or undefined, dW1, db1, dg1, ds1, dW2, db2, dg2, ds2) from x, the parameters and dh [P, M]
std::vector<torch::Tensor> radial_hidden_backward(torch::Tensor x, std::vector<torch::Tensor> weights, bool norm,
                                                  double eps, torch::Tensor grad_h, bool need_x) {
  const auto params = with_transposes(weights);
  check(x, params);
  const int64_t P = x.size(0), M = params[0].size(0), K = x.size(1);
  TORCH_CHECK(grad_h.sizes() == at::IntArrayRef({P, M}) && grad_h.is_contiguous() &&
                  grad_h.scalar_type() == x.scalar_type(),
              "expected a contiguous gradient [P, M] of the rows' dtype");
  const int64_t sizes[8] = {M * K, M, M, M, M * M, M, M, M};  // dW1, db1, dg1, ds1, dW2, db2, dg2, ds2
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  auto partial = torch::zeros({at::get_num_threads(), total}, x.options());
  auto grad_x = need_x ? torch::empty_like(x) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "radial_hidden_backward", [&] {
    using T = scalar_t;
    const Mlp<T> q = mlp_of<T>(params, norm, eps);
    const T *xp = x.data_ptr<T>(), *gp = grad_h.data_ptr<T>();
    T *gxp = need_x ? grad_x.data_ptr<T>() : nullptr, *partial_p = partial.data_ptr<T>();
    const int64_t blocks = (P + ROWS - 1) / ROWS;
    with_width(M, [&](auto width) {
      constexpr int MM = decltype(width)::value;
      at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
        T* dW1 = partial_p + at::get_thread_num() * total;  // this thread's sums
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t p = b * ROWS;
          T* gx = gxp == nullptr ? nullptr : gxp + p * K;
          backward_block<T, MM>(q, xp + p * K, int(std::min<int64_t>(ROWS, P - p)), gp + p * MM, dW1, gx);
        }
      });
    });
  });
  std::vector<torch::Tensor> out = {grad_x};
  auto summed = partial.sum(0);
  int64_t offset = 0;
  for (int64_t s : sizes) out.push_back(summed.narrow(0, offset, s)), offset += s;
  out[1] = out[1].view({K, M}).t().contiguous(), out[5] = out[5].view({M, M});
  return out;
}

}  // namespace radial

// ---------------------------------------------------------------------------------------------------------------------
// 3. NormNonlinearity (nbs/06_norm.ipynb, backend `native` of the op `norm_nonlinearity`). For every node n
// and degree l, with x_l [N, C_l, D_l] and its channels c:
//   r_c = |x_c|,  v_c = max(r_c, clamp),  z_c = (v_c - mean_c v) / sqrt(var_c v + eps),  a_c = gamma_c z_c + beta_c,
//   y_c = x_c relu(a_c) / v_c
// (the per-degree layer norm of the norms, ReLU, each vector rescaled to its new norm), node by node for each degree
// of a thread's nodes, no intermediate tensor. Backward recomputes the statistics from x. float32 and float64.

namespace norms {

void check(const std::vector<torch::Tensor>& xs, const torch::Tensor& gamma, const torch::Tensor& beta) {
  TORCH_CHECK(!xs.empty(), "expected at least one degree");
  int64_t channels = 0;
  for (const auto& x : xs) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == xs[0].size(0) && x.scalar_type() == xs[0].scalar_type() &&
                    x.is_contiguous() && x.device().is_cpu(),
                "expected contiguous CPU tensors x_l [N, C_l, D_l] of one dtype and one N");
    channels += x.size(1);
  }
  TORCH_CHECK(gamma.dim() == 1 && beta.dim() == 1 && gamma.size(0) == channels && beta.size(0) == channels &&
                  gamma.scalar_type() == xs[0].scalar_type() && beta.scalar_type() == xs[0].scalar_type() &&
                  gamma.is_contiguous() && beta.is_contiguous(),
              "expected gamma and beta [sum C_l] of the features' dtype");
}

// One node's rows of one degree, x [C, D] (D = 2l+1): r_c = |x_c|, v_c = max(r_c, clamp), their layer norm over the C
// channels (z, a = gamma z + beta, 1 / std), and s_c = relu(a_c) / v_c, the factor of x_c. Node by node: the C channels
// of a node are side by side in memory, so every per-channel step is a vector loop over c and x is read in order (16
// nodes side by side, read with a stride of C D floats, were 1.3-2.8x slower at QM9's 32 channels of degrees 0-3 and
// about as fast at 16 channels of degrees 0-2, Zen 5).
template <typename T, int D, int CC>
inline T channel_stats(const T* x, int64_t C, const T* gamma, const T* beta, T eps, T clamp, T* r, T* v, T* z, T* a,
                       T* s) {  // returns 1 / std
  if constexpr (CC > 0) C = CC;  // a compile-time count: loops unrolled, no remainder
  for (int64_t c = 0; c < C; ++c) {  // x in order; no vector pragma on loops with stride D: gathers, scatters
    T sq = 0;
    for (int d = 0; d < D; ++d) sq += x[c * D + d] * x[c * D + d];
    r[c] = sq;
  }
  T mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
  for (int64_t c = 0; c < C; ++c) {
    r[c] = std::sqrt(r[c]);
    v[c] = r[c] > clamp ? r[c] : clamp;
    mean += v[c];
  }
  mean /= C;
#pragma omp simd reduction(+ : var)
  for (int64_t c = 0; c < C; ++c) var += (v[c] - mean) * (v[c] - mean);
  const T rstd = T(1) / std::sqrt(var / C + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    z[c] = (v[c] - mean) * rstd;
    a[c] = gamma[c] * z[c] + beta[c];
    s[c] = (a[c] > 0 ? a[c] : T(0)) / v[c];  // new norm / old norm
  }
  return rstd;
}

template <typename T, int D, int CC>
void forward_rows(const T* x, T* y, int64_t n0, int64_t n1, int64_t C, const T* gamma, const T* beta, T eps, T clamp,
                  T* buf) {  // nodes n0..n1 of one degree; buf: 5 C scratch values
  if constexpr (CC > 0) C = CC;
  T *r = buf, *v = r + C, *z = v + C, *a = z + C, *s = a + C;
  for (int64_t n = n0; n < n1; ++n) {
    const T* xn = x + n * C * D;
    T* yn = y + n * C * D;
    channel_stats<T, D, CC>(xn, C, gamma, beta, eps, clamp, r, v, z, a, s);
    for (int64_t c = 0; c < C; ++c)
      for (int d = 0; d < D; ++d) yn[c * D + d] = xn[c * D + d] * s[c];
  }
}

// The same rows' backward: gx, and the gamma and beta gradients added to sums[0..C) and sums[channels..+C)
template <typename T, int D, int CC>
void backward_rows(const T* x, const T* gy, T* gx, int64_t n0, int64_t n1, int64_t C, const T* gamma, const T* beta,
                   T eps, T clamp, T* sums, int64_t channels, T* buf) {  // buf: 7 C scratch values
  if constexpr (CC > 0) C = CC;
  // gv holds per channel, in turn: sum_d gy x, the gradient of v, the factor of x in gx (one buffer in L1)
  T *r = buf, *v = r + C, *z = v + C, *a = z + C, *s = a + C, *gv = s + C, *gz = gv + C;
  for (int64_t n = n0; n < n1; ++n) {
    const T *xn = x + n * C * D, *gyn = gy + n * C * D;
    T* gxn = gx + n * C * D;
    const T rstd = channel_stats<T, D, CC>(xn, C, gamma, beta, eps, clamp, r, v, z, a, s);
    for (int64_t c = 0; c < C; ++c) {  // d/ds of y = x s: sum over the components of gy x
      T dot = 0;
      for (int d = 0; d < D; ++d) dot += gyn[c * D + d] * xn[c * D + d];
      gv[c] = dot;
    }
    T mean_gz = 0, mean_gzz = 0;
#pragma omp simd reduction(+ : mean_gz, mean_gzz)
    for (int64_t c = 0; c < C; ++c) {
      const T dot = gv[c];
      const T ga = a[c] > 0 ? dot / v[c] : T(0);  // through s = relu(a) / v
      gv[c] = -dot * s[c] / v[c];
      sums[c] += ga * z[c], sums[channels + c] += ga;
      gz[c] = ga * gamma[c];
      mean_gz += gz[c], mean_gzz += gz[c] * z[c];
    }
    mean_gz /= C, mean_gzz /= C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {  // layer norm's backward, then d|x|/dx = x / |x| (none where clamped)
      const T grad_v = gv[c] + rstd * (gz[c] - mean_gz - z[c] * mean_gzz);
      gv[c] = r[c] >= clamp ? grad_v / r[c] : T(0);
    }
    for (int64_t c = 0; c < C; ++c)
      for (int d = 0; d < D; ++d) gxn[c * D + d] = gyn[c * D + d] * s[c] + xn[c * D + d] * gv[c];
  }
}

constexpr int64_t NODES = 16;  // nodes per task of at::parallel_for

template <typename F>
void with_layout(int64_t D, int64_t C, F&& f) {  // f(D, CC): CC = C for the usual 16 or 32 channels, else 0
  with_components(D, [&](auto d) {
    if (C == 16) return f(d, std::integral_constant<int, 16>{});
    if (C == 32) return f(d, std::integral_constant<int, 32>{});
    f(d, std::integral_constant<int, 0>{});
  });
}

template <typename T>
void forward_kernel(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ys,
                    const torch::Tensor& gamma, const torch::Tensor& beta, T eps, T clamp, int64_t max_c) {
  const int64_t N = xs[0].size(0);
  const T *gp = gamma.data_ptr<T>(), *bp = beta.data_ptr<T>();
  at::parallel_for(0, N, NODES, [&](int64_t n0, int64_t n1) {
    std::vector<T> buf(5 * max_c);
    int64_t off = 0;
    for (size_t l = 0; l < xs.size(); ++l) {  // degree by degree over this thread's nodes
      const int64_t C = xs[l].size(1);
      with_layout(xs[l].size(2), C, [&](auto D, auto CC) {
        forward_rows<T, D(), CC()>(xs[l].data_ptr<T>(), ys[l].data_ptr<T>(), n0, n1, C, gp + off, bp + off, eps, clamp,
                                   buf.data());
      });
      off += C;
    }
  });
}

template <typename T>
void backward_kernel(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& gxs,
                     const std::vector<torch::Tensor>& grads, const torch::Tensor& gamma, const torch::Tensor& beta,
                     const torch::Tensor& partial, T eps, T clamp, int64_t max_c) {
  const int64_t N = xs[0].size(0), channels = gamma.size(0);
  const T *gp = gamma.data_ptr<T>(), *bp = beta.data_ptr<T>();
  T* partial_p = partial.data_ptr<T>();
  at::parallel_for(0, N, NODES, [&](int64_t n0, int64_t n1) {
    std::vector<T> buf(7 * max_c);
    T* sums = partial_p + at::get_thread_num() * 2 * channels;  // [2, channels]
    int64_t off = 0;
    for (size_t l = 0; l < xs.size(); ++l) {
      const int64_t C = xs[l].size(1);
      with_layout(xs[l].size(2), C, [&](auto D, auto CC) {
        backward_rows<T, D(), CC()>(xs[l].data_ptr<T>(), grads[l].data_ptr<T>(), gxs[l].data_ptr<T>(), n0, n1, C,
                                    gp + off, bp + off, eps, clamp, sums + off, channels, buf.data());
      });
      off += C;
    }
  });
}

std::vector<torch::Tensor> norm_nonlinearity_forward(std::vector<torch::Tensor> xs, torch::Tensor gamma,
                                                     torch::Tensor beta, double eps, double clamp) {
  check(xs, gamma, beta);
  std::vector<torch::Tensor> ys;
  int64_t max_c = 0;
  for (const auto& x : xs) ys.push_back(torch::empty_like(x)), max_c = std::max(max_c, x.size(1));
  AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "norm_nonlinearity_forward", [&] {
    forward_kernel<scalar_t>(xs, ys, gamma, beta, scalar_t(eps), scalar_t(clamp), max_c);
  });
  return ys;
}

// Returns the gradients of every x_l, then of gamma and beta ([sum C_l] each).
std::vector<torch::Tensor> norm_nonlinearity_backward(std::vector<torch::Tensor> xs, torch::Tensor gamma,
                                                      torch::Tensor beta, double eps, double clamp,
                                                      std::vector<torch::Tensor> grads) {
  check(xs, gamma, beta);
  TORCH_CHECK(grads.size() == xs.size(), "expected one gradient per degree");
  std::vector<torch::Tensor> gxs;
  int64_t max_c = 0;
  for (size_t l = 0; l < xs.size(); ++l) {
    TORCH_CHECK(grads[l].sizes() == xs[l].sizes() && grads[l].is_contiguous() &&
                    grads[l].scalar_type() == xs[l].scalar_type(),
                "each gradient must be contiguous, of its degree's shape and dtype");
    gxs.push_back(torch::empty_like(xs[l]));
    max_c = std::max(max_c, xs[l].size(1));
  }
  const int64_t channels = gamma.size(0);
  // per thread: sums of the gamma and beta gradients over its nodes (no atomics; summed in a fixed order below)
  auto partial = torch::zeros({at::get_num_threads(), 2, channels}, gamma.options());
  AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "norm_nonlinearity_backward", [&] {
    backward_kernel<scalar_t>(xs, gxs, grads, gamma, beta, partial, scalar_t(eps), scalar_t(clamp), max_c);
  });
  auto param_grads = partial.sum(0);  // [2, channels]
  gxs.push_back(param_grads[0]);
  gxs.push_back(param_grads[1]);
  return gxs;
}

}  // namespace norms

// ---------------------------------------------------------------------------------------------------------------------
// 4. Channel mixing (nbs/04_conv.ipynb, backend `native` of the op `channel_mix`): for every output j, the sum over its
// terms t of  y_j[n, o, d] += sum_c W_j[o, off_t + c] x_t[n, c, d]  (x_t [N, C_t, D]: a degree's features, or one part
// of channels concatenated in W_j's columns from off_t on), all outputs in one pass per node. The features keep their
// [N, C, 2l+1] layout: torch's matrix product needs them transposed, copied and copied back (~40 us per degree on
// 1,169 nodes of 16 channels, single-threaded). Backward: dx_t = W_t^T dy_j per node; dW_j summed per thread over its
// nodes, then over threads in a fixed order. float32 and float64; plain C++.

namespace mixing {

struct Terms {  // the terms' outputs, column offsets and sizes, checked once
  std::vector<int64_t> out, off, C, D;
  int64_t N = 0;
  Terms(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& weights,
        const std::vector<int64_t>& outs, const std::vector<int64_t>& offsets) {
    TORCH_CHECK(!xs.empty() && outs.size() == xs.size() && offsets.size() == xs.size(),
                "expected one output index and one column offset per input");
    N = xs[0].size(0);
    for (const auto& w : weights)
      TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == xs[0].scalar_type(),
                  "expected contiguous weights [O, C] of the inputs' dtype");
    for (size_t t = 0; t < xs.size(); ++t) {
      const auto& x = xs[t];
      TORCH_CHECK(x.dim() == 3 && x.size(0) == N && x.is_contiguous() && x.device().is_cpu() &&
                      x.scalar_type() == xs[0].scalar_type(),
                  "expected contiguous CPU inputs x_t [N, C_t, D_t] of one dtype and one N");
      TORCH_CHECK(outs[t] >= 0 && outs[t] < static_cast<int64_t>(weights.size()), "output index out of range");
      const auto& w = weights[outs[t]];
      const int64_t cols = w.size(1);
      TORCH_CHECK(offsets[t] >= 0 && offsets[t] + x.size(1) <= cols, "input ", t, " with ", x.size(1),
                  " channels from column ", offsets[t], " does not fit its weight's ", cols, " columns");
      out.push_back(outs[t]), off.push_back(offsets[t]), C.push_back(x.size(1)), D.push_back(x.size(2));
    }
    for (size_t t = 0; t < xs.size(); ++t)
      for (size_t u = 0; u < t; ++u)
        TORCH_CHECK(out[t] != out[u] || D[t] == D[u], "the inputs of one output must have the same D");
  }
};

constexpr int L = 16;  // output channels per accumulator row: a multiple of every vector width, a compile-time loop
constexpr int BLOCK = 16;  // nodes per block of the weight gradient
constexpr int OB = 8;  // outputs per pass of the weight gradient

// acc[n * D + d][0..L) = sum_c x_n[c][d] M[c][0..L) for NB nodes x_n (x_n [C][D]; nodes past the block's end read
// its last one, their rows are not stored): every row of M loaded once for NB * D rows of accumulators
template <typename T, int D, int NB>
inline void mix_rows(const T* const (&x)[NB], int64_t C, const T* M, int64_t ms, T (&acc)[NB * D][L]) {
  for (int k = 0; k < NB * D; ++k)
#pragma omp simd
    for (int v = 0; v < L; ++v) acc[k][v] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T* m = M + c * ms;
    for (int n = 0; n < NB; ++n)
      for (int d = 0; d < D; ++d) {
        const T s = x[n][c * D + d];
#pragma omp simd
        for (int v = 0; v < L; ++v) acc[n * D + d][v] += s * m[v];
      }
  }
}

// y_n[o][d] = sum_c x_n[c][d] M[c][o] for every node of `x` [N, C, D]: y [N, O, D]; M [C][Op] zero-padded to Op >= O,
// a multiple of L. Parallel over blocks of NB nodes; adds to y with `add`.
template <typename T, int D>
void mix_nodes(const T* x, int64_t N, int64_t C, const T* M, int64_t O, int64_t Op, T* y, bool add) {
  constexpr int NB = D == 1 ? 8 : D == 3 ? 4 : D == 5 ? 2 : 1;  // NB * D <= 12 rows of accumulators
  at::parallel_for(0, (N + NB - 1) / NB, 4, [&](int64_t b0, int64_t b1) {
    T acc[NB * D][L];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, N - n0);
      const T* xn[NB];
      for (int n = 0; n < NB; ++n) xn[n] = x + (n0 + std::min<int64_t>(n, nb - 1)) * C * D;
      for (int64_t o0 = 0; o0 < Op; o0 += L) {
        mix_rows<T, D, NB>(xn, C, M + o0, Op, acc);
        const int64_t no = std::min<int64_t>(L, O - o0);
        for (int64_t n = 0; n < nb; ++n)
          for (int64_t o = 0; o < no; ++o)
            for (int d = 0; d < D; ++d) {
              T& out = y[((n0 + n) * O + o0 + o) * D + d];
              out = add ? out + acc[n * D + d][o] : acc[n * D + d][o];
            }
      }
    }
  });
}

inline int64_t padded(int64_t n) { return (n + L - 1) / L * L; }

// M[c][o] = W[o][c0 + c] (transposed) or M[o][c] = W[o][c0 + c], rows zero-padded to a multiple of L: the matrix of
// one term for `mix_nodes` (W [O, cols] row-major)
template <typename T>
std::vector<T> term_matrix(const T* W, int64_t O, int64_t cols, int64_t c0, int64_t C, bool transposed) {
  const int64_t width = padded(transposed ? O : C);
  std::vector<T> M((transposed ? C : O) * width, T(0));
  for (int64_t o = 0; o < O; ++o)
    for (int64_t c = 0; c < C; ++c) M[transposed ? c * width + o : o * width + c] = W[o * cols + c0 + c];
  return M;
}

// sums[o][c] += sum_n sum_d gy_n[o][d] x_n[c][d] over nodes n0..n1 (x [N, C, D], gy [N, O, D], sums row stride ss)
template <typename T, int D>
void weight_gradient(const T* x, const T* gy, int64_t n0, int64_t n1, int64_t C, int64_t O, T* sums, int64_t ss) {
  const int64_t Cp = padded(C);
  std::vector<T> xt(BLOCK * D * Cp, T(0));  // one block of x, transposed: [node][d][c]
  for (int64_t b = n0; b < n1; b += BLOCK) {
    const int64_t nb = std::min<int64_t>(BLOCK, n1 - b);
    for (int64_t n = 0; n < nb; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int d = 0; d < D; ++d) xt[(n * D + d) * Cp + c] = x[((b + n) * C + c) * D + d];
    for (int64_t o0 = 0; o0 < O; o0 += OB) {
      const int64_t no = std::min<int64_t>(OB, O - o0);  // outputs past O repeat the last one, not stored
      for (int64_t c0 = 0; c0 < Cp; c0 += L) {
        T acc[OB][L] = {};  // OB outputs per loaded vector of x: OB FMAs per load, not one
        for (int64_t n = 0; n < nb; ++n)
          for (int d = 0; d < D; ++d) {
            const T* xv = xt.data() + (n * D + d) * Cp + c0;
            for (int k = 0; k < OB; ++k) {
              const T g = gy[((b + n) * O + o0 + std::min<int64_t>(k, no - 1)) * D + d];
#pragma omp simd
              for (int v = 0; v < L; ++v) acc[k][v] += g * xv[v];
            }
          }
        for (int64_t k = 0; k < no; ++k) {
          T* s = sums + (o0 + k) * ss + c0;
          for (int64_t v = 0; v < std::min<int64_t>(L, C - c0); ++v) s[v] += acc[k][v];
        }
      }
    }
  }
}

// y_j [N, O_j, D_j] per output from inputs x_t, weights W_j [O_j, cols_j], each input's output and column offset.
std::vector<torch::Tensor> channel_mix_forward(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> ws,
                                               std::vector<int64_t> outs, std::vector<int64_t> offsets) {
  const Terms terms(xs, ws, outs, offsets);
  std::vector<torch::Tensor> ys;
  for (size_t j = 0; j < ws.size(); ++j) {
    int64_t D = -1;
    for (size_t t = 0; t < xs.size(); ++t)
      if (terms.out[t] == static_cast<int64_t>(j)) D = terms.D[t];
    TORCH_CHECK(D >= 0, "output ", j, " has no input");
    ys.push_back(torch::empty({terms.N, ws[j].size(0), D}, xs[0].options()));
  }
  std::vector<bool> first(ws.size(), true);
  for (size_t t = 0; t < xs.size(); ++t) {  // the first input of an output writes it, the others add to it
    const int64_t j = terms.out[t], O = ws[j].size(0);
    AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "channel_mix_forward", [&] {
      const int64_t C = terms.C[t];
      const auto M = term_matrix<scalar_t>(ws[j].data_ptr<scalar_t>(), O, ws[j].size(1), terms.off[t], C, true);
      with_components(terms.D[t], [&](auto D) {
        mix_nodes<scalar_t, D>(xs[t].data_ptr<scalar_t>(), terms.N, C, M.data(), O, padded(O),
                               ys[j].data_ptr<scalar_t>(), !first[j]);
      });
    });
    first[j] = false;
  }
  return ys;
}

// (dx_t per input, or none without need_x; then dW_j per output, or none without need_w)
std::vector<torch::Tensor> channel_mix_backward(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> ws,
                                                std::vector<int64_t> outs, std::vector<int64_t> offsets,
                                                std::vector<torch::Tensor> grads, bool need_x, bool need_w) {
  const Terms terms(xs, ws, outs, offsets);
  TORCH_CHECK(grads.size() == ws.size(), "expected one gradient per output");
  for (size_t t = 0; t < xs.size(); ++t) {
    const auto& g = grads[terms.out[t]];
    TORCH_CHECK(g.dim() == 3 && g.size(0) == terms.N && g.size(1) == ws[terms.out[t]].size(0) &&
                    g.size(2) == terms.D[t] && g.is_contiguous() && g.scalar_type() == xs[0].scalar_type(),
                "gradient ", terms.out[t], " must be contiguous [N, O_j, D_j] of the inputs' dtype, not ", g.sizes());
  }
  std::vector<torch::Tensor> result;
  for (size_t t = 0; need_x && t < xs.size(); ++t) {  // dx_t = W_t^T dy: the forward's pass with W_t's columns
    const int64_t j = terms.out[t], O = ws[j].size(0), C = terms.C[t];
    result.push_back(torch::empty_like(xs[t]));
    AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "channel_mix_backward", [&] {
      const auto M = term_matrix<scalar_t>(ws[j].data_ptr<scalar_t>(), O, ws[j].size(1), terms.off[t], C, false);
      with_components(terms.D[t], [&](auto D) {
        mix_nodes<scalar_t, D>(grads[j].data_ptr<scalar_t>(), terms.N, O, M.data(), C, padded(C),
                               result.back().data_ptr<scalar_t>(), false);
      });
    });
  }
  if (need_w) {
    std::vector<int64_t> starts;  // where each output's dW begins in a thread's sums
    int64_t total = 0;
    for (const auto& w : ws) starts.push_back(total), total += w.numel();
    for (const auto& w : ws) result.push_back(torch::empty_like(w));
    AT_DISPATCH_FLOATING_TYPES(xs[0].scalar_type(), "channel_mix_backward", [&] {
      // per thread: dW of every output summed over its nodes (no atomics; summed in a fixed order below)
      const int threads = at::get_num_threads();
      std::vector<scalar_t> partial(threads * total, scalar_t(0));
      at::parallel_for(0, terms.N, 64, [&](int64_t n0, int64_t n1) {
        scalar_t* sums = partial.data() + at::get_thread_num() * total;
        for (size_t t = 0; t < xs.size(); ++t) {
          const int64_t j = terms.out[t];
          with_components(terms.D[t], [&](auto D) {
            weight_gradient<scalar_t, D>(xs[t].data_ptr<scalar_t>(), grads[j].data_ptr<scalar_t>(), n0, n1,
                                         terms.C[t], ws[j].size(0), sums + starts[j] + terms.off[t], ws[j].size(1));
          });
        }
      });
      for (size_t j = 0; j < ws.size(); ++j) {
        scalar_t* dw = result[result.size() - ws.size() + j].data_ptr<scalar_t>();
        for (int64_t i = 0; i < ws[j].numel(); ++i) {
          scalar_t s = 0;
          for (int k = 0; k < threads; ++k) s += partial[k * total + starts[j] + i];
          dw[i] = s;
        }
      }
    });
  }
  return result;
}

}  // namespace mixing

// ---------------------------------------------------------------------------------------------------------------------
// 5. Rows as weighted sums of rows (nbs/04a_so2.ipynb, backend `native` of the op `so2_fold`):
//   out[r, :] = sum_j coef[r, j] x[index[r, j], :]      index, coef [R, J]
// The fold of a last radial layer into SO(2) weights is one (T per channel pair, then rows moved into block order), and
// so is its gradient (T transposed, rows moved back): a table each, made once per plan. torch did it with a batched
// product of 3 x 3 to 9 x 9 matrices per channel pair and a gather (~0.15 ms per group and step in training).

namespace folding {

torch::Tensor combine_rows(torch::Tensor x, torch::Tensor index, torch::Tensor coef) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "expected a contiguous CPU x [S, H]");
  TORCH_CHECK(index.dim() == 2 && index.is_contiguous() && index.scalar_type() == torch::kLong,
              "expected a contiguous int64 index [R, J]");
  TORCH_CHECK(coef.sizes() == index.sizes() && coef.is_contiguous() && coef.scalar_type() == x.scalar_type(),
              "expected coefficients [R, J] of x's dtype, like the index ", index.sizes(), "; got ", coef.sizes());
  const int64_t R = index.size(0), J = index.size(1), S = x.size(0), H = x.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  bool inside = true;  // a plain loop: torch's min() and max() cost two reductions and allocations per call
  for (int64_t k = 0; k < R * J; ++k) inside &= idx[k] >= 0 && idx[k] < S;
  TORCH_CHECK(inside, "index out of range [0, ", S, ")");
  auto out = torch::empty({R, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "combine_rows", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *cp = coef.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* y = yp + r * H;
        for (int64_t h = 0; h < H; ++h) y[h] = 0;
        for (int64_t j = 0; j < J; ++j) {
          const scalar_t c = cp[r * J + j];
          const scalar_t* row = xp + idx[r * J + j] * H;
          for (int64_t h = 0; h < H; ++h) y[h] += c * row[h];
        }
      }
    });
  });
  return out;
}

}  // namespace folding

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("frame_matrices", &frames::frame_matrices,
        "(D_in, D_out) per degree (rel_pos [E, 3], slot_edges [E], couplings, extended rows, signs, rows by m)");
  m.def("slot_layout", &frames::slot_layout,
        "(first [P], second [pairs], slot_edges [E], position [E], pairs, zero-length slots) of the SO(2) slots "
        "(src [E], dst [E], rel_pos [E, 3], invariants [E, F], num_nodes)");
  m.def("radial_hidden_forward", &radial::radial_hidden_forward,
        "h [P, M] (x [P, K], [W1, b1, g1, s1, W2, b2, g2, s2], norm, eps)");
  m.def("radial_hidden_backward", &radial::radial_hidden_backward,
        "[dx or undefined, dW1, db1, dg1, ds1, dW2, db2, dg2, ds2] (x, parameters, norm, eps, dh, need_x)");
  m.def("norm_nonlinearity_forward", &norms::norm_nonlinearity_forward,
        "y_l (x_l [N, C_l, D_l] per degree, gamma [sum C], beta [sum C], eps, clamp)");
  m.def("norm_nonlinearity_backward", &norms::norm_nonlinearity_backward,
        "(dx_l per degree, dgamma, dbeta) from (x_l, gamma, beta, eps, clamp, dy_l)");
  m.def("channel_mix_forward", &mixing::channel_mix_forward,
        "y_j per output (x_t [N, C_t, D_t], weights W_j [O_j, cols_j], each input's output and column offset)");
  m.def("channel_mix_backward", &mixing::channel_mix_backward,
        "(dx_t per input if need_x, dW_j per output if need_w) (x_t, W_j [O_j, cols_j], outputs, offsets, dy_j, ...)");
  m.def("combine_rows", &folding::combine_rows,
        "out [R, H]: out[r] = sum_j coef[r, j] x[index[r, j]] (x [S, H], index [R, J] int64, coef [R, J])");
}
