// CPU kernels of the radial MLPs' hidden layers (nbs/04_conv.ipynb, backend `native` of the op `radial_hidden`). Per
// row x [K] of the edge invariants:
//   y1 = LN1(W1 x + b1),  a1 = relu(y1),  y2 = LN2(W2 a1 + b2),  h = relu(y2)
// where LN is a layer norm over the M hidden units with a learned scale and shift (or nothing, without layer norms).
// One pass per row with every intermediate in L1; backward recomputes them from x, and sums the parameter gradients
// per thread, then over threads in a fixed order. torch spends ~20 us per operation on these small shapes (1,209 rows
// of 32 units): the MLP's ~12 operations and their backward cost more than its arithmetic. float32 and float64.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {


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
  for (int r = 0; r < ROWS; ++r) {
    rstd[r] = T(1);
    if (norm) {
      T mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
      for (int m = 0; m < MM; ++m) mean += z[r][m];
      mean /= MM;
#pragma omp simd reduction(+ : var)
      for (int m = 0; m < MM; ++m) var += (z[r][m] - mean) * (z[r][m] - mean);
      rstd[r] = T(1) / std::sqrt(var / MM + eps);
#pragma omp simd
      for (int m = 0; m < MM; ++m) z[r][m] = (z[r][m] - mean) * rstd[r];
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
  T mean_dz = 0, mean_dzz = 0;
#pragma omp simd reduction(+ : mean_dz, mean_dzz)
  for (int m = 0; m < MM; ++m) {
    const T dy = g[m] * z[m] + s[m] > 0 ? da[m] : T(0);
    dg[m] += dy * z[m], ds[m] += dy;
    du[m] = dy * g[m];  // dz for now
    mean_dz += du[m], mean_dzz += du[m] * z[m];
  }
  mean_dz /= MM, mean_dzz /= MM;
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

}  // namespace

// h [P, M] from x [P, K] and the parameters (W1, W1t, b1, g1, s1, W2, W2t, b2, g2, s2; g and s unused without norms)
torch::Tensor radial_hidden_forward(torch::Tensor x, std::vector<torch::Tensor> params, bool norm, double eps) {
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
std::vector<torch::Tensor> radial_hidden_backward(torch::Tensor x, std::vector<torch::Tensor> params, bool norm,
                                                  double eps, torch::Tensor grad_h, bool need_x) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("radial_hidden_forward", &radial_hidden_forward,
        "h [P, M] (x [P, K], [W1, W1t, b1, g1, s1, W2, W2t, b2, g2, s2], norm, eps)");
  m.def("radial_hidden_backward", &radial_hidden_backward,
        "[dx or undefined, dW1, db1, dg1, ds1, dW2, db2, dg2, ds2] (x, parameters, norm, eps, dh, need_x)");
}
