// CPU kernels of segment attention (nbs/03a_segment_attention.ipynb, backend `native` of the op `segment_attention`):
// for every node n and head h, over the node's run of incoming edges e in [offsets[n], offsets[n+1]) (edges sorted by
// destination),
//   s_e = scale <k_e, q_n>,  p_e = exp(s_e - max_e s_e),  w_e = u_e p_e,  z = sum_e u_e w_e v_e / (sum_e w_e + eps)
// (without an envelope u = 1 and eps = 0), in one pass per node and head with no per-edge tensor written; and the
// gradients of z with respect to k, q, v and u (scores recomputed). float32 and float64; plain C++ (any x86-64 CPU).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

void check(const torch::Tensor& key, const torch::Tensor& query, const torch::Tensor& value,
           const torch::Tensor& offsets, const torch::Tensor& envelope) {
  TORCH_CHECK(key.dim() == 3 && query.dim() == 3 && value.dim() == 3,
              "expected key [E, H, dk], query [N, H, dk], value [E, H, dv]");
  TORCH_CHECK(key.size(1) == query.size(1) && key.size(2) == query.size(2) && value.size(0) == key.size(0) &&
                  value.size(1) == key.size(1),
              "key, query and value shapes do not match");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && key.scalar_type() == value.scalar_type(),
              "one dtype for key, query and value");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1 && query.is_contiguous(),
              "key and value rows may be strided, their last dimension must be contiguous; query contiguous");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == query.size(0) + 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              "offsets must be [N + 1] int64");
  if (envelope.defined())
    TORCH_CHECK(envelope.dim() == 1 && envelope.size(0) == key.size(0) && envelope.scalar_type() == key.scalar_type() &&
                    envelope.is_contiguous(),
                "envelope must be [E] of the key's dtype");
}

}  // namespace

// Returns z [N, H, dv], and the statistics m (running max) and S (sum of u p) [N, H] that backward reuses.
std::vector<torch::Tensor> segment_attention_forward(torch::Tensor key, torch::Tensor query, torch::Tensor value,
                                                     torch::Tensor offsets, c10::optional<torch::Tensor> envelope_opt,
                                                     double scale) {
  const torch::Tensor envelope = envelope_opt.has_value() ? *envelope_opt : torch::Tensor();
  check(key, query, value, offsets, envelope);
  const int64_t N = query.size(0), H = key.size(1), dk = key.size(2), dv = value.size(2);
  auto z = torch::zeros({N, H, dv}, value.options());
  auto M = torch::zeros({N, H}, value.options()), S = torch::zeros({N, H}, value.options());
  const int64_t* off = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(key.scalar_type(), "segment_attention_forward", [&] {
    const scalar_t *k = key.data_ptr<scalar_t>(), *q = query.data_ptr<scalar_t>(), *v = value.data_ptr<scalar_t>();
    const scalar_t* u = envelope.defined() ? envelope.data_ptr<scalar_t>() : nullptr;
    const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
    scalar_t *zp = z.data_ptr<scalar_t>(), *mp = M.data_ptr<scalar_t>(), *sp = S.data_ptr<scalar_t>();
    const scalar_t eps = u ? scalar_t(1e-12) : scalar_t(0);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      std::vector<scalar_t> s;
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t e0 = off[n], e1 = off[n + 1];
        if (e1 <= e0) continue;  // no incoming edges: z = 0
        s.resize(e1 - e0);
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* qn = q + (n * H + h) * dk;
          scalar_t m = -std::numeric_limits<scalar_t>::infinity();
          for (int64_t e = e0; e < e1; ++e) {
            const scalar_t* ke = k + e * ks0 + h * ks1;
            scalar_t dot = 0;
            for (int64_t i = 0; i < dk; ++i) dot += ke[i] * qn[i];
            s[e - e0] = dot * scalar_t(scale);
            m = std::max(m, s[e - e0]);
          }
          scalar_t* zn = zp + (n * H + h) * dv;
          scalar_t total = 0;
          for (int64_t e = e0; e < e1; ++e) {
            const scalar_t p = std::exp(s[e - e0] - m);
            const scalar_t w = u ? u[e] * p : p, a = u ? u[e] * w : p;
            total += w;
            const scalar_t* ve = v + e * vs0 + h * vs1;
            for (int64_t i = 0; i < dv; ++i) zn[i] += a * ve[i];
          }
          const scalar_t inv = scalar_t(1) / (total + eps);
          for (int64_t i = 0; i < dv; ++i) zn[i] *= inv;
          mp[n * H + h] = m;
          sp[n * H + h] = total;
        }
      }
    });
  });
  return {z, M, S};
}

// Gradients (dkey, dquery, dvalue, denvelope) from grad_z and forward's z, m, S; denvelope is undefined without one
// (or when not needed).
std::vector<torch::Tensor> segment_attention_backward(torch::Tensor key, torch::Tensor query, torch::Tensor value,
                                                      torch::Tensor offsets, c10::optional<torch::Tensor> envelope_opt,
                                                      double scale, torch::Tensor z, torch::Tensor M, torch::Tensor S,
                                                      torch::Tensor grad_z, bool envelope_grad,
                                                      c10::optional<torch::Tensor> grad_key_out,
                                                      c10::optional<torch::Tensor> grad_value_out) {
  const torch::Tensor envelope = envelope_opt.has_value() ? *envelope_opt : torch::Tensor();
  check(key, query, value, offsets, envelope);
  grad_z = grad_z.contiguous();
  const int64_t N = query.size(0), E = key.size(0), H = key.size(1), dk = key.size(2), dv = value.size(2);
  // dkey and dvalue may be given: e.g. column slices of one buffer (the gradient of one tensor of keys and values)
  auto given = [](const c10::optional<torch::Tensor>& out, const torch::Tensor& like, const char* what) {
    if (!out.has_value()) return torch::empty_like(like, at::MemoryFormat::Contiguous);
    TORCH_CHECK(out->sizes() == like.sizes() && out->scalar_type() == like.scalar_type() && out->stride(2) == 1,
                what, " must have the shape and dtype of its input, its last dimension contiguous");
    return *out;
  };
  auto gk = given(grad_key_out, key, "grad_key_out"), gv = given(grad_value_out, value, "grad_value_out");
  auto gq = torch::zeros_like(query);
  const bool want_u = envelope.defined() && envelope_grad;
  auto gu = want_u ? torch::zeros({E}, key.options()) : torch::Tensor();
  const int64_t* off = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(key.scalar_type(), "segment_attention_backward", [&] {
    const scalar_t *k = key.data_ptr<scalar_t>(), *q = query.data_ptr<scalar_t>(), *v = value.data_ptr<scalar_t>();
    const scalar_t* u = envelope.defined() ? envelope.data_ptr<scalar_t>() : nullptr;
    const scalar_t *zp = z.data_ptr<scalar_t>(), *mp = M.data_ptr<scalar_t>(), *sp = S.data_ptr<scalar_t>();
    const scalar_t* g = grad_z.data_ptr<scalar_t>();
    scalar_t *gkp = gk.data_ptr<scalar_t>(), *gqp = gq.data_ptr<scalar_t>(), *gvp = gv.data_ptr<scalar_t>();
    const int64_t ks0 = key.stride(0), ks1 = key.stride(1), vs0 = value.stride(0), vs1 = value.stride(1);
    const int64_t gks0 = gk.stride(0), gks1 = gk.stride(1), gvs0 = gv.stride(0), gvs1 = gv.stride(1);
    scalar_t* gup = want_u ? gu.data_ptr<scalar_t>() : nullptr;
    const scalar_t eps = u ? scalar_t(1e-12) : scalar_t(0), sc = scalar_t(scale);
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const int64_t e0 = off[n], e1 = off[n + 1];
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t *qn = q + (n * H + h) * dk, *gn = g + (n * H + h) * dv, *zn = zp + (n * H + h) * dv;
          scalar_t D = 0;
          for (int64_t i = 0; i < dv; ++i) D += gn[i] * zn[i];
          const scalar_t m = mp[n * H + h], denominator = sp[n * H + h] + eps;
          scalar_t* dq = gqp + (n * H + h) * dk;
          for (int64_t e = e0; e < e1; ++e) {
            const scalar_t *ke = k + e * ks0 + h * ks1, *ve = v + e * vs0 + h * vs1;
            scalar_t dot = 0, delta = 0;
            for (int64_t i = 0; i < dk; ++i) dot += ke[i] * qn[i];
            for (int64_t i = 0; i < dv; ++i) delta += ve[i] * gn[i];
            const scalar_t p = std::exp(dot * sc - m) / denominator;
            scalar_t alpha, ds;
            if (u) {
              const scalar_t beta = u[e] * p;
              alpha = u[e] * beta;
              ds = beta * (u[e] * delta - D);
              if (gup) gup[e] += beta * delta + p * (u[e] * delta - D);
            } else {
              alpha = p;
              ds = p * (delta - D);
            }
            scalar_t *dve = gvp + e * gvs0 + h * gvs1, *dke = gkp + e * gks0 + h * gks1;
            for (int64_t i = 0; i < dv; ++i) dve[i] = alpha * gn[i];
            for (int64_t i = 0; i < dk; ++i) {
              dke[i] = sc * ds * qn[i];
              dq[i] += sc * ds * ke[i];
            }
          }
        }
      }
    });
  });
  return {gk, gq, gv, gu};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_attention_forward", &segment_attention_forward, "segment attention forward (CPU)");
  m.def("segment_attention_backward", &segment_attention_backward, "segment attention backward (CPU)");
}
