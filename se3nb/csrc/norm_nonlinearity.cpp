// CPU kernels of NormNonlinearity (nbs/06_norm.ipynb, backend `native` of the op `norm_nonlinearity`). For every node n
// and degree l, with x_l [N, C_l, D_l] and its channels c:
//   r_c = |x_c|,  v_c = max(r_c, clamp),  z_c = (v_c - mean_c v) / sqrt(var_c v + eps),  a_c = gamma_c z_c + beta_c,
//   y_c = x_c relu(a_c) / v_c
// (the per-degree layer norm of the norms, ReLU, each vector rescaled to its new norm), in one pass per node for all
// degrees and no intermediate tensor. Backward recomputes the statistics from x. float32 and float64; plain C++.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

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

constexpr int64_t LANES = 16;  // nodes side by side: every per-channel step is a vector operation across nodes

template <typename T>
struct Degrees {  // raw pointers and sizes, looked up once
  std::vector<const T*> x, gy;
  std::vector<T*> out;
  std::vector<int64_t> C, D;
  Degrees(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& outs,
          const std::vector<torch::Tensor>& grads) {
    for (size_t l = 0; l < xs.size(); ++l) {
      x.push_back(xs[l].data_ptr<T>()), out.push_back(outs[l].data_ptr<T>());
      gy.push_back(grads.empty() ? nullptr : grads[l].data_ptr<T>());
      C.push_back(xs[l].size(1)), D.push_back(xs[l].size(2));
    }
  }
};

// One degree of nodes n0..n0+nb (lane n): r = |x_c|, v = max(r, clamp), z, a = gamma z + beta per channel ([C][LANES]
// each), and 1 / std per lane. x of node n0 + n is at x + n * C * D (lanes read with stride C * D).
template <typename T>
void degree_stats(const T* x, int64_t nb, int64_t C, int64_t D, const T* gamma, const T* beta, T eps, T clamp, T* r,
                  T* v, T* z, T* a, T* rstd) {
  const int64_t CD = C * D;
  T mean[LANES] = {}, var[LANES] = {};
  for (int64_t c = 0; c < C; ++c) {
    T* rc = r + c * LANES;
#pragma omp simd
    for (int64_t n = 0; n < LANES; ++n) rc[n] = 0;
    for (int64_t d = 0; d < D; ++d)
#pragma omp simd
      for (int64_t n = 0; n < nb; ++n) rc[n] += x[n * CD + c * D + d] * x[n * CD + c * D + d];
#pragma omp simd
    for (int64_t n = 0; n < LANES; ++n) {
      rc[n] = std::sqrt(rc[n]);
      v[c * LANES + n] = rc[n] > clamp ? rc[n] : clamp;
      mean[n] += v[c * LANES + n];
    }
  }
#pragma omp simd
  for (int64_t n = 0; n < LANES; ++n) mean[n] /= C;
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t n = 0; n < LANES; ++n) var[n] += (v[c * LANES + n] - mean[n]) * (v[c * LANES + n] - mean[n]);
#pragma omp simd
  for (int64_t n = 0; n < LANES; ++n) rstd[n] = T(1) / std::sqrt(var[n] / C + eps);
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t n = 0; n < LANES; ++n) {
      z[c * LANES + n] = (v[c * LANES + n] - mean[n]) * rstd[n];
      a[c * LANES + n] = gamma[c] * z[c * LANES + n] + beta[c];
    }
}

template <typename T>
void forward_kernel(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& ys,
                    const torch::Tensor& gamma, const torch::Tensor& beta, T eps, T clamp, int64_t max_c) {
  const int64_t N = xs[0].size(0), blocks = (N + LANES - 1) / LANES;
  const Degrees<T> deg(xs, ys, {});
  const T *gp = gamma.data_ptr<T>(), *bp = beta.data_ptr<T>();
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(4 * max_c * LANES + LANES);
    T *r = buf.data(), *v = r + max_c * LANES, *z = v + max_c * LANES, *a = z + max_c * LANES;
    T* rstd = a + max_c * LANES;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * LANES, nb = std::min(LANES, N - n0);
      int64_t off = 0;
      for (size_t l = 0; l < deg.C.size(); ++l) {
        const int64_t C = deg.C[l], D = deg.D[l], CD = C * D;
        const T* x = deg.x[l] + n0 * CD;
        T* y = deg.out[l] + n0 * CD;
        degree_stats<T>(x, nb, C, D, gp + off, bp + off, T(eps), T(clamp), r, v, z, a, rstd);
        for (int64_t c = 0; c < C; ++c) {
          T s[LANES];
#pragma omp simd
          for (int64_t n = 0; n < LANES; ++n) {
            const int64_t k = c * LANES + n;
            s[n] = (a[k] > 0 ? a[k] : T(0)) / v[k];  // new norm / old norm
          }
          for (int64_t d = 0; d < D; ++d)
#pragma omp simd
            for (int64_t n = 0; n < nb; ++n) y[n * CD + c * D + d] = x[n * CD + c * D + d] * s[n];
        }
        off += C;
      }
    }
  });
}

template <typename T>
void backward_kernel(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& gxs,
                     const std::vector<torch::Tensor>& grads, const torch::Tensor& gamma, const torch::Tensor& beta,
                     const torch::Tensor& partial, T eps, T clamp, int64_t max_c) {
  const int64_t N = xs[0].size(0), channels = gamma.size(0), blocks = (N + LANES - 1) / LANES;
  const Degrees<T> deg(xs, gxs, grads);
  const T *gp = gamma.data_ptr<T>(), *bp = beta.data_ptr<T>();
  T* partial_p = partial.data_ptr<T>();
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(6 * max_c * LANES + LANES);
    T *r = buf.data(), *v = r + max_c * LANES, *z = v + max_c * LANES, *a = z + max_c * LANES;
    T *gv = a + max_c * LANES, *gz = gv + max_c * LANES, *rstd = gz + max_c * LANES;
    T* sums = partial_p + at::get_thread_num() * 2 * channels;  // [2, channels]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * LANES, nb = std::min(LANES, N - n0);
      int64_t off = 0;
      for (size_t l = 0; l < deg.C.size(); ++l) {
        const int64_t C = deg.C[l], D = deg.D[l], CD = C * D;
        const T *x = deg.x[l] + n0 * CD, *gy = deg.gy[l] + n0 * CD, *g = gp + off;
        T* gx = deg.out[l] + n0 * CD;
        degree_stats<T>(x, nb, C, D, g, bp + off, T(eps), T(clamp), r, v, z, a, rstd);
        T mean_gz[LANES] = {}, mean_gzz[LANES] = {};
        for (int64_t c = 0; c < C; ++c) {
          T dot[LANES] = {};  // d/ds of y = x s: sum over the components of gy x
          for (int64_t d = 0; d < D; ++d)
#pragma omp simd
            for (int64_t n = 0; n < nb; ++n) dot[n] += gy[n * CD + c * D + d] * x[n * CD + c * D + d];
          T sum_gz = 0, sum_ga = 0;
#pragma omp simd reduction(+ : sum_gz, sum_ga)
          for (int64_t n = 0; n < LANES; ++n) {
            const int64_t k = c * LANES + n;
            const T ga = a[k] > 0 ? dot[n] / v[k] : T(0);  // through s = relu(a) / v
            gv[k] = -dot[n] * (a[k] > 0 ? a[k] : T(0)) / (v[k] * v[k]);
            sum_gz += n < nb ? ga * z[k] : T(0);
            sum_ga += n < nb ? ga : T(0);
            gz[k] = ga * g[c];
            mean_gz[n] += gz[k];
            mean_gzz[n] += gz[k] * z[k];
          }
          sums[off + c] += sum_gz, sums[channels + off + c] += sum_ga;
        }
#pragma omp simd
        for (int64_t n = 0; n < LANES; ++n) mean_gz[n] /= C, mean_gzz[n] /= C;
        for (int64_t c = 0; c < C; ++c) {
          T s[LANES], k[LANES];
#pragma omp simd
          for (int64_t n = 0; n < LANES; ++n) {
            const int64_t i = c * LANES + n;  // layer norm's backward, then d|x|/dx = x / |x| (none where clamped)
            const T grad_v = gv[i] + rstd[n] * (gz[i] - mean_gz[n] - z[i] * mean_gzz[n]);
            k[n] = r[i] >= clamp ? grad_v / r[i] : T(0);
            s[n] = (a[i] > 0 ? a[i] : T(0)) / v[i];
          }
          for (int64_t d = 0; d < D; ++d)
#pragma omp simd
            for (int64_t n = 0; n < nb; ++n) {
              const int64_t e = n * CD + c * D + d;
              gx[e] = gy[e] * s[n] + x[e] * k[n];
            }
        }
        off += C;
      }
    }
  });
}

}  // namespace

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_nonlinearity_forward", &norm_nonlinearity_forward,
        "y_l (x_l [N, C_l, D_l] per degree, gamma [sum C], beta [sum C], eps, clamp)");
  m.def("norm_nonlinearity_backward", &norm_nonlinearity_backward,
        "(dx_l per degree, dgamma, dbeta) from (x_l, gamma, beta, eps, clamp, dy_l)");
}
