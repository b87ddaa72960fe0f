// CPU kernel of the edge frames (nbs/04a_so2.ipynb, backend `native` of the op `edge_frames`): for every row r of the
// SO(2) layout and its edge e = slot_edges[r], the rotation R taking the edge direction to y (rows: x, y, z axes of the
// frame, as `edge_rotations`), its Wigner D matrices D_0 = 1, D_1 = R, D_l = C_l^T (D_{l-1} (x) R) C_l (`wigner_D`),
// per degree the rows the SO(2) path reads: D_in (rows by m, part-b rows repeated with signs) and D_out (rows by m).
// One pass per edge, without the ~30 batched torch operations (outer products, index copies) of the reference.
// No gradients: frames of positions that need them are built by torch. float32 and float64.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

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
template <typename T>
void next_wigner(const T* prev, const T* R, const T* C, int64_t m, int64_t n, T* U, T* Tm, T* D) {
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

}  // namespace

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
          if (l >= 2) next_wigner(prev, R, C[l], n - 2, n, U.data(), Tm.data(), cur);
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("frame_matrices", &frame_matrices,
        "(D_in, D_out) per degree (rel_pos [E, 3], slot_edges [E], couplings, extended rows, signs, rows by m)");
}
