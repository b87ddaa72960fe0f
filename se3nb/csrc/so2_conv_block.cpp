// Fused float32 CPU kernel of se3nb's no-grad inference in blocks (nbs/04a_so2.ipynb, `so2_inference` backend
// `native`): the messages of one SO(2) convolution (se3nb.so2.SO2Conv) for a block of edges, each edge computed once
// (no slots of reverse edges: every edge has its own radial evaluation, and nothing is duplicated for lone edges).
//
// Edges are processed 32 at a time, one edge per SIMD lane (two AVX-512 registers), so that every small matrix of the
// convolution (3 x 3 rotations, 8 x 3 products, ...) runs at full vector width. For each edge e and kernel group g:
//   1. radial MLP up to its last layer: h = relu(norm(W2 relu(norm(W1 inv_e + b1)) + b2))     [K]
//   2. edge frame R_e (rows: x, y, z axes; y along rel_pos) and D_l(R_e); identity for edges of length 0
//   3. gather the inputs x_l = node_l[src_e] (+ edge_l[e] channels) and rotate them: x'_l = D_l x_l, rows by m
//   4. per m-block: y = x_m W_m(h)^T, W_m(h)[o, i] = sum_k h[k] theta[o*I + i, k]; 12 rows of W for the 32 edges are
//      built in registers and used at once, W is never stored; edges of length 0 use theta_zero (J = 0 only)
//   5. rotate back: out_l[e, c, :] = sum_m y'_{l, m}[c] D_l[l + m, :], written to the columns the caller asks for
// m-block layout (SO2Plan, nbs/04a_so2.ipynb): m = 0: one row (x'_{l,0} over the group's input degrees l);
// m > 0: row 0 (x'_{+m}, -x'_{-m}) -> y'_{+m}, row 1 (x'_{-m}, x'_{+m}) -> y'_{-m}; columns (part, l, c), rows of W
// (l_out, c_out). Compiled with -mavx512f -mavx512dq -mfma -fopenmp; float32 only.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

namespace {

constexpr int kLanes = 32;  // edges per tile
constexpr int kRows = 12;   // rows of a weight matrix built together: 24 accumulators

struct Block {  // one m-block of one group
  int64_t m, s, O, I, offset;  // offset: first row of theta
  std::vector<int64_t> lis, los;
};

struct Group {
  std::vector<int64_t> ins, outs;
  int64_t C_in, C_out;
  std::vector<Block> blocks;
  int64_t rows;  // rows of theta
};

std::vector<Group> parse_layout(const std::vector<int64_t>& layout) {
  std::vector<Group> groups;
  size_t p = 0;
  auto next = [&]() {
    TORCH_CHECK(p < layout.size(), "layout ends early");
    return layout[p++];
  };
  while (p < layout.size()) {
    Group g;
    for (int64_t a = 0, n = next(); a < n; ++a) g.ins.push_back(next());
    for (int64_t a = 0, n = next(); a < n; ++a) g.outs.push_back(next());
    g.C_in = next();
    g.C_out = next();
    TORCH_CHECK(!g.ins.empty() && !g.outs.empty(), "a group needs input and output degrees");
    const int64_t top = std::min(*std::max_element(g.ins.begin(), g.ins.end()),
                                 *std::max_element(g.outs.begin(), g.outs.end()));
    int64_t offset = 0;
    for (int64_t m = 0; m <= top; ++m) {
      Block b;
      b.m = m;
      b.s = m == 0 ? 1 : 2;
      for (int64_t l : g.ins)
        if (l >= m) b.lis.push_back(l);
      for (int64_t l : g.outs)
        if (l >= m) b.los.push_back(l);
      b.O = (int64_t)b.los.size() * g.C_out;
      b.I = b.s * (int64_t)b.lis.size() * g.C_in;
      b.offset = offset;
      offset += b.O * b.I;
      g.blocks.push_back(b);
    }
    g.rows = offset;
    groups.push_back(g);
  }
  return groups;
}

// acc[j] = sum_k w[(row0 + j) * K + k] in[k, lanes] for j < J: J rows of a matrix times the tile's vectors.
template <int J>
inline void build_rows(const float* w, const float* in, int64_t K, int64_t row0, __m512 (&acc)[kRows][2]) {
  for (int j = 0; j < J; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  const float* t = w + row0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 h0 = _mm512_loadu_ps(in + k * kLanes), h1 = _mm512_loadu_ps(in + k * kLanes + 16);
    for (int j = 0; j < J; ++j) {
      const __m512 tk = _mm512_set1_ps(t[j * K + k]);
      acc[j][0] = _mm512_fmadd_ps(tk, h0, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(tk, h1, acc[j][1]);
    }
  }
}

// y[r, o, lanes] += W[o, i] x[r, i, lanes] for the J rows (o, i) of W from row0 of an m-block.
template <int J>
inline void product_rows(const float* theta, const float* hT, const float* x, float* y, int64_t K, int64_t s,
                         int64_t O, int64_t I, int64_t row0) {
  __m512 acc[kRows][2];
  build_rows<J>(theta, hT, K, row0, acc);
  for (int j = 0; j < J; ++j) {
    const int64_t o = (row0 + j) / I, i = (row0 + j) % I;
    for (int64_t r = 0; r < s; ++r) {
      const float* xr = x + (r * I + i) * kLanes;
      float* yr = y + (r * O + o) * kLanes;
      _mm512_storeu_ps(yr, _mm512_fmadd_ps(acc[j][0], _mm512_loadu_ps(xr), _mm512_loadu_ps(yr)));
      _mm512_storeu_ps(yr + 16, _mm512_fmadd_ps(acc[j][1], _mm512_loadu_ps(xr + 16), _mm512_loadu_ps(yr + 16)));
    }
  }
}

// out[j, lanes] = b[j] + sum_k W[j, k] in[k, lanes] for j < rows (a linear layer on the tile).
template <int J>
inline void linear_rows(const float* W, const float* b, const float* in, float* out, int64_t K, int64_t row0) {
  __m512 acc[kRows][2];
  build_rows<J>(W, in, K, row0, acc);
  for (int j = 0; j < J; ++j) {
    const __m512 bj = _mm512_set1_ps(b ? b[row0 + j] : 0.f);
    _mm512_storeu_ps(out + (row0 + j) * kLanes, _mm512_add_ps(acc[j][0], bj));
    _mm512_storeu_ps(out + (row0 + j) * kLanes + 16, _mm512_add_ps(acc[j][1], bj));
  }
}

template <template <int> class F, typename... Args>
inline void by_rows(int64_t rows, Args... args) {  // F<kRows> over full chunks, then F<rest> once
  int64_t r0 = 0;
  for (; r0 + kRows <= rows; r0 += kRows) F<kRows>::run(args..., r0);
  switch (rows - r0) {
    case 0: break;
    case 1: F<1>::run(args..., r0); break;
    case 2: F<2>::run(args..., r0); break;
    case 3: F<3>::run(args..., r0); break;
    case 4: F<4>::run(args..., r0); break;
    case 5: F<5>::run(args..., r0); break;
    case 6: F<6>::run(args..., r0); break;
    case 7: F<7>::run(args..., r0); break;
    case 8: F<8>::run(args..., r0); break;
    case 9: F<9>::run(args..., r0); break;
    case 10: F<10>::run(args..., r0); break;
    default: F<11>::run(args..., r0);
  }
}

template <int J>
struct Product {
  __attribute__((noinline)) static void run(const float* theta, const float* hT, const float* x, float* y, int64_t K,
                                            int64_t s, int64_t O, int64_t I, int64_t row0) {
    product_rows<J>(theta, hT, x, y, K, s, O, I, row0);
  }
};

template <int J>
struct Linear {
  __attribute__((noinline)) static void run(const float* W, const float* b, const float* in, float* out, int64_t K,
                                            int64_t row0) {
    linear_rows<J>(W, b, in, out, K, row0);
  }
};

// LayerNorm over the rows (features) of each lane, then ReLU; in place on x[rows, lanes].
inline void norm_relu(float* x, int64_t rows, const float* gamma, const float* beta, float eps) {
  for (int half = 0; half < 2; ++half) {
    float* xh = x + 16 * half;
    if (gamma) {
      __m512 mean = _mm512_setzero_ps(), var = _mm512_setzero_ps();
      for (int64_t j = 0; j < rows; ++j) mean = _mm512_add_ps(mean, _mm512_loadu_ps(xh + j * kLanes));
      mean = _mm512_div_ps(mean, _mm512_set1_ps((float)rows));
      for (int64_t j = 0; j < rows; ++j) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(xh + j * kLanes), mean);
        var = _mm512_fmadd_ps(d, d, var);
      }
      var = _mm512_div_ps(var, _mm512_set1_ps((float)rows));
      const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_sqrt_ps(_mm512_add_ps(var, _mm512_set1_ps(eps))));
      for (int64_t j = 0; j < rows; ++j) {
        const __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(xh + j * kLanes), mean), inv);
        const __m512 t = _mm512_fmadd_ps(v, _mm512_set1_ps(gamma[j]), _mm512_set1_ps(beta ? beta[j] : 0.f));
        _mm512_storeu_ps(xh + j * kLanes, _mm512_max_ps(t, _mm512_setzero_ps()));
      }
    } else {
      for (int64_t j = 0; j < rows; ++j)
        _mm512_storeu_ps(xh + j * kLanes, _mm512_max_ps(_mm512_loadu_ps(xh + j * kLanes), _mm512_setzero_ps()));
    }
  }
}

// Rotation taking r / |r| to the y axis (rows: the frame's x, y, z axes), as `edge_rotations` (nbs/04a_so2.ipynb).
inline bool edge_frame(const float* r, float* R) {
  const float n = std::sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
  const bool zero = n <= 1e-12f;
  float u[3] = {0.f, 1.f, 0.f};
  if (!zero)
    for (int a = 0; a < 3; ++a) u[a] = r[a] / n;
  float hx[3] = {1.f, 0.f, 0.f};
  if (std::fabs(u[0]) > 0.9f) hx[0] = 0.f, hx[2] = 1.f;
  const float dot = hx[0] * u[0] + hx[1] * u[1] + hx[2] * u[2];
  float ex[3] = {hx[0] - dot * u[0], hx[1] - dot * u[1], hx[2] - dot * u[2]};
  const float en = std::sqrt(ex[0] * ex[0] + ex[1] * ex[1] + ex[2] * ex[2]);
  for (int a = 0; a < 3; ++a) ex[a] /= en;
  const float ez[3] = {ex[1] * u[2] - ex[2] * u[1], ex[2] * u[0] - ex[0] * u[2], ex[0] * u[1] - ex[1] * u[0]};
  for (int a = 0; a < 3; ++a) R[a] = ex[a], R[3 + a] = u[a], R[6 + a] = ez[a];
  return zero;
}

torch::Tensor defined_or_empty(const std::vector<torch::Tensor>& v, size_t i) {
  return i < v.size() && v[i].defined() && v[i].numel() ? v[i] : torch::Tensor();
}

}  // namespace

// node_feats[l]: [N, C_l, 2l+1] (empty: degree absent); edge_feats[l]: [E, Ce_l, 2l+1] concatenated after the node
// channels (empty: none); invariants [E, F]; rel_pos [E, 3]; src [E]: the graph's; eids [e]: the block's edges.
// frames: empty (computed here, degrees <= 1 only) or D_l [e, 2l+1, 2l+1] for l = 0..L of the block's edges.
// radial: per group 8 tensors W1 [H, F], b1, g1, beta1, W2 [H, H], b2, g2, beta2 (g, beta empty without LayerNorm).
// theta, theta_zero: per group [rows, H] (SO2Plan.fold, and its zero_length fold). Returns per output degree l the
// messages [e, C_l, 2l+1] (empty where out_channels[l] == 0).
torch::Tensor so2_conv_block(std::vector<torch::Tensor> node_feats, std::vector<torch::Tensor> edge_feats,
                                          torch::Tensor invariants, torch::Tensor rel_pos, torch::Tensor src,
                                          torch::Tensor eids, std::vector<torch::Tensor> frames,
                                          std::vector<torch::Tensor> radial, double eps,
                                          std::vector<torch::Tensor> theta, std::vector<torch::Tensor> theta_zero,
                                          std::vector<int64_t> layout, std::vector<int64_t> out_channels,
                                          std::vector<torch::Tensor> out_columns, int64_t width) {
  const auto groups = parse_layout(layout);
  const size_t G = groups.size();
  TORCH_CHECK(theta.size() == G && theta_zero.size() == G && radial.size() == 8 * G,
              "expected per group one theta, one theta_zero and 8 radial tensors");
  auto f32 = [](const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, " must be float32 and contiguous");
  };
  TORCH_CHECK(eids.dim() == 1 && eids.scalar_type() == at::kLong && eids.is_contiguous(), "eids must be [e] int64");
  TORCH_CHECK(src.dim() == 1 && src.scalar_type() == at::kLong && src.is_contiguous(), "src must be [E] int64");
  f32(invariants, "invariants");
  f32(rel_pos, "rel_pos");
  const int64_t e_total = eids.size(0), E = src.size(0), F = invariants.size(1);
  TORCH_CHECK(invariants.dim() == 2 && invariants.size(0) == E && rel_pos.size(0) == E && rel_pos.size(1) == 3,
              "invariants [E, F] and rel_pos [E, 3] must have the graph's edges");
  const int64_t L_in = (int64_t)node_feats.size() - 1, L_out = (int64_t)out_channels.size() - 1;
  const int64_t L = std::max(L_in, L_out);
  std::vector<int64_t> C_node(L_in + 1, 0), C_edge(L_in + 1, 0), C_in(L_in + 1, 0);
  std::vector<const float*> node_ptr(L_in + 1, nullptr), edge_ptr(L_in + 1, nullptr);
  for (int64_t l = 0; l <= L_in; ++l) {
    auto x = defined_or_empty(node_feats, l), y = defined_or_empty(edge_feats, l);
    if (x.defined()) {
      f32(x, "node features");
      TORCH_CHECK(x.dim() == 3 && x.size(2) == 2 * l + 1, "node_feats[", l, "] must be [N, C, ", 2 * l + 1, "]");
      C_node[l] = x.size(1);
      node_ptr[l] = x.data_ptr<float>();
    }
    if (y.defined()) {
      f32(y, "edge features");
      TORCH_CHECK(l > 0 && y.dim() == 3 && y.size(0) == E && y.size(2) == 2 * l + 1,
                  "edge_feats[", l, "] must be [E, C, ", 2 * l + 1, "] with l > 0");
      C_edge[l] = y.size(1);
      edge_ptr[l] = y.data_ptr<float>();
    }
    C_in[l] = C_node[l] + C_edge[l];
  }
  const bool own_frames = frames.empty();
  TORCH_CHECK(!own_frames || L <= 1, "degrees above 1 need their Wigner matrices in `frames`");
  std::vector<const float*> D_ptr(L + 1, nullptr);
  if (!own_frames) {
    TORCH_CHECK((int64_t)frames.size() > L, "frames must hold D_l for l = 0..", L);
    for (int64_t l = 1; l <= L; ++l) {
      f32(frames[l], "frames");
      TORCH_CHECK(frames[l].dim() == 3 && frames[l].size(0) == e_total && frames[l].size(1) == 2 * l + 1 &&
                      frames[l].size(2) == 2 * l + 1,
                  "frames[", l, "] must be [e, ", 2 * l + 1, ", ", 2 * l + 1, "]");
      D_ptr[l] = frames[l].data_ptr<float>();
    }
  }
  int64_t H = -1;
  for (size_t g = 0; g < G; ++g) {
    const auto& Gr = groups[g];
    const auto &W1 = radial[8 * g], &W2 = radial[8 * g + 4];
    f32(W1, "W1");
    f32(W2, "W2");
    if (H < 0) H = W1.size(0);
    TORCH_CHECK(W1.dim() == 2 && W1.size(1) == F && W1.size(0) == H && W2.size(0) == H && W2.size(1) == H,
                "radial MLP ", g, ": expected W1 [H, ", F, "] and W2 [H, H] with one H for all groups");
    for (int a : {1, 2, 3, 5, 6, 7})
      if (radial[8 * g + a].defined() && radial[8 * g + a].numel()) {
        f32(radial[8 * g + a], "radial");
        TORCH_CHECK(radial[8 * g + a].numel() == H, "radial MLP vectors must have H entries");
      }
    for (auto* t : {&theta[g], &theta_zero[g]}) {
      f32(*t, "theta");
      TORCH_CHECK(t->dim() == 2 && t->size(0) == Gr.rows && t->size(1) == H, "theta of group ", g, " must be [",
                  Gr.rows, ", ", H, "]");
    }
    for (int64_t l : Gr.ins)
      TORCH_CHECK(l <= L_in && C_in[l] == Gr.C_in, "group ", g, ": input degree ", l, " has ",
                  l <= L_in ? C_in[l] : 0, " channels, expected ", Gr.C_in);
    for (int64_t l : Gr.outs)
      TORCH_CHECK(l <= L_out && out_channels[l] == Gr.C_out, "group ", g, ": output degree ", l, " has ",
                  l <= L_out ? out_channels[l] : 0, " channels, expected ", Gr.C_out);
  }
  auto opts = invariants.options();
  TORCH_CHECK((int64_t)out_columns.size() == L_out + 1, "out_columns: one [C_l] tensor per output degree");
  std::vector<const int64_t*> col_ptr(L_out + 1, nullptr);
  for (int64_t l = 0; l <= L_out; ++l) {
    if (!out_channels[l]) continue;
    const auto& t = out_columns[l];
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == out_channels[l],
                "out_columns[", l, "] must be [", out_channels[l], "] int64");
    col_ptr[l] = t.data_ptr<int64_t>();
    for (int64_t c = 0; c < out_channels[l]; ++c)
      TORCH_CHECK(col_ptr[l][c] >= 0 && col_ptr[l][c] + 2 * l + 1 <= width, "out_columns[", l, "] out of range");
  }
  auto out = torch::zeros({e_total, width}, opts);
  float* out_p = out.data_ptr<float>();
  // per-tile buffer (floats; every value has kLanes lanes)
  std::vector<int64_t> xo(L_in + 2, 0), yo(L_out + 2, 0);
  for (int64_t l = 0; l <= L_in; ++l) xo[l + 1] = xo[l] + (2 * l + 1) * C_in[l] * kLanes;
  for (int64_t l = 0; l <= L_out; ++l) yo[l + 1] = yo[l] + (2 * l + 1) * out_channels[l] * kLanes;
  int64_t block_buf = 0;
  for (const auto& Gr : groups)
    for (const auto& b : Gr.blocks) block_buf = std::max(block_buf, b.s * (b.I + 2 * b.O) * kLanes);
  int64_t n_xg = 0, n_D = 0;  // raw gathered inputs / rotated-back outputs of one degree; rotations of every degree
  for (int64_t l = 0; l <= L_in; ++l) n_xg = std::max(n_xg, (2 * l + 1) * C_in[l] * kLanes);
  for (int64_t l = 0; l <= L_out; ++l) n_xg = std::max(n_xg, (2 * l + 1) * out_channels[l] * kLanes);
  for (int64_t l = 1; l <= L; ++l) n_D += (2 * l + 1) * (2 * l + 1) * kLanes;
  const int64_t n_inv = F * kLanes, n_h = 2 * H * kLanes;
  const int64_t buf_size = xo.back() + yo.back() + block_buf + n_inv + n_h + n_D + n_xg;
  const float *inv_p = invariants.data_ptr<float>(), *rel_p = rel_pos.data_ptr<float>();
  const int64_t *src_p = src.data_ptr<int64_t>(), *eid_p = eids.data_ptr<int64_t>();
  const float feps = (float)eps;
  const int64_t tiles = (e_total + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(buf_size, 0.f);
    float* xf = buf.data();         // x'_l [m-row][c][lane]
    float* yf = xf + xo.back();     // y'_l [m-row][c][lane]
    float* xb = yf + yo.back();     // an m-block's x [s, I], y [s, O] and y of the zero-length edges
    float* invT = xb + block_buf;   // invariants [F][lane]
    float* hT = invT + n_inv;       // hidden layers [2][H][lane]
    std::vector<float*> Dl(L + 1, nullptr);  // D_l [(2l+1)^2][lane]
    for (int64_t l = 1, off = 0; l <= L; off += (2 * l + 1) * (2 * l + 1) * kLanes, ++l) Dl[l] = hT + n_h + off;
    float* R1 = L >= 1 ? Dl[1] : nullptr;  // the frame [9][lane] when computed here
    float* xg = hT + n_h + n_D;     // gathered inputs [c][j][lane] / rotated-back outputs
    int64_t eid[kLanes];
    bool zero[kLanes];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t e0 = tile * kLanes, n = std::min<int64_t>(kLanes, e_total - e0);
      if (n < kLanes) std::fill(buf.begin(), buf.end(), 0.f);  // padding lanes compute on zeros, never written
      std::fill(yf, yf + yo.back(), 0.f);
      bool any_zero = false;
      for (int a = 0; a < kLanes; ++a) eid[a] = a < n ? eid_p[e0 + a] : eid_p[e0];
      // frames
      for (int64_t a = 0; a < n; ++a) {
        const float* r = rel_p + eid[a] * 3;
        if (own_frames) {
          float R[9];
          zero[a] = edge_frame(r, R);
          for (int q = 0; q < 9; ++q) R1[q * kLanes + a] = R[q];
        } else {
          zero[a] = std::sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]) <= 1e-12f;
        }
        any_zero |= zero[a];
      }
      // the rotations D_l of the tile's edges in lanes: Dl[l][(row * d + j) * kLanes + lane]
      for (int64_t l = 1; l <= L && !own_frames; ++l) {
        const int64_t dd = (2 * l + 1) * (2 * l + 1);
        for (int64_t a = 0; a < n; ++a)
          for (int64_t q = 0; q < dd; ++q) Dl[l][q * kLanes + a] = D_ptr[l][(e0 + a) * dd + q];
      }
      // gather the inputs (lanes) and rotate them into the edge frames: x'[row][c] = sum_j D[row][j] x[c][j]
      for (int64_t l = 0; l <= L_in; ++l) {
        if (!C_in[l]) continue;
        const int64_t d = 2 * l + 1;
        float* x = xf + xo[l];
        float* raw = l == 0 ? x : xg;  // degree 0: no rotation
        for (int64_t a = 0; a < n; ++a) {
          const float* parts[2] = {node_ptr[l] ? node_ptr[l] + src_p[eid[a]] * C_node[l] * d : nullptr,
                                   edge_ptr[l] ? edge_ptr[l] + eid[a] * C_edge[l] * d : nullptr};
          const int64_t counts[2] = {C_node[l], C_edge[l]};
          for (int p = 0, c0 = 0; p < 2; c0 += counts[p], ++p)
            if (parts[p])
              for (int64_t q = 0; q < counts[p] * d; ++q) raw[(c0 * d + q) * kLanes + a] = parts[p][q];
        }
        if (l == 0) continue;
        const float* D = Dl[l];
        for (int64_t c = 0; c < C_in[l]; ++c)
          for (int64_t row = 0; row < d; ++row) {
            float* out = x + (row * C_in[l] + c) * kLanes;
            for (int a = 0; a < kLanes; ++a) out[a] = 0.f;
            for (int64_t j = 0; j < d; ++j) {
              const float* Dr = D + (row * d + j) * kLanes;
              const float* in = xg + (c * d + j) * kLanes;
              for (int a = 0; a < kLanes; ++a) out[a] += Dr[a] * in[a];
            }
          }
      }
      for (int64_t a = 0; a < n; ++a)
        for (int64_t k = 0; k < F; ++k) invT[k * kLanes + a] = inv_p[eid[a] * F + k];
      for (size_t g = 0; g < G; ++g) {
        const auto& Gr = groups[g];
        auto vec = [&](int a) {
          const auto& t = radial[8 * g + a];
          return t.defined() && t.numel() ? t.data_ptr<float>() : (const float*)nullptr;
        };
        // radial MLP up to its last layer, in lanes
        float *h1 = hT, *h2 = hT + H * kLanes;
        by_rows<Linear>(H, radial[8 * g].data_ptr<float>(), vec(1), (const float*)invT, h1, F);
        norm_relu(h1, H, vec(2), vec(3), feps);
        by_rows<Linear>(H, radial[8 * g + 4].data_ptr<float>(), vec(5), (const float*)h1, h2, H);
        norm_relu(h2, H, vec(6), vec(7), feps);
        for (const auto& b : Gr.blocks) {
          const int64_t s = b.s, I = b.I, O = b.O, m = b.m, Ci = Gr.C_in, Co = Gr.C_out, nl = (int64_t)b.lis.size();
          float *x = xb, *y = xb + s * I * kLanes, *yz = y + s * O * kLanes;
          for (int64_t part = 0; part < s; ++part)
            for (int64_t bi = 0; bi < nl; ++bi) {
              const int64_t l = b.lis[bi];
              const float* xp = xf + xo[l] + (l + m) * C_in[l] * kLanes;  // x'_{+m}
              const float* xm = xf + xo[l] + (l - m) * C_in[l] * kLanes;  // x'_{-m}
              for (int64_t c = 0; c < Ci; ++c) {
                float* r0 = x + ((part * nl + bi) * Ci + c) * kLanes;
                float* r1 = r0 + I * kLanes;
                for (int a = 0; a < kLanes; ++a) {
                  const float p = xp[c * kLanes + a], q = xm[c * kLanes + a];
                  if (s == 1) {
                    r0[a] = p;
                  } else if (part == 0) {
                    r0[a] = p, r1[a] = q;
                  } else {
                    r0[a] = -q, r1[a] = p;
                  }
                }
              }
            }
          std::fill(y, y + s * O * kLanes, 0.f);
          by_rows<Product>(O * I, theta[g].data_ptr<float>() + b.offset * H, (const float*)h2, (const float*)x, y, H,
                           s, O, I);
          if (any_zero) {  // edges of length 0: their own weights (J = 0 only)
            std::fill(yz, yz + s * O * kLanes, 0.f);
            by_rows<Product>(O * I, theta_zero[g].data_ptr<float>() + b.offset * H, (const float*)h2,
                             (const float*)x, yz, H, s, O, I);
            for (int64_t v = 0; v < s * O; ++v)
              for (int64_t a = 0; a < n; ++a)
                if (zero[a]) y[v * kLanes + a] = yz[v * kLanes + a];
          }
          for (int64_t r = 0; r < s; ++r)
            for (size_t ai = 0; ai < b.los.size(); ++ai) {
              const int64_t l = b.los[ai], row = r == 0 ? l + m : l - m;
              float* yp = yf + yo[l] + row * out_channels[l] * kLanes;
              const float* ys = y + (r * O + (int64_t)ai * Co) * kLanes;
              for (int64_t v = 0; v < Co * kLanes; ++v) yp[v] += ys[v];
            }
        }
      }
      // rotate back in lanes, o[c][j] = sum_row y'[row][c] D[row][j], then write each edge's row
      for (int64_t l = 0; l <= L_out; ++l) {
        if (!out_channels[l]) continue;
        const int64_t d = 2 * l + 1, C = out_channels[l];
        const float* yp = yf + yo[l];
        const float* o = yp;
        if (l > 0) {
          const float* D = Dl[l];
          for (int64_t c = 0; c < C; ++c)
            for (int64_t j = 0; j < d; ++j) {
              float* t = xg + (c * d + j) * kLanes;
              for (int a = 0; a < kLanes; ++a) t[a] = 0.f;
              for (int64_t row = 0; row < d; ++row) {
                const float* Dr = D + (row * d + j) * kLanes;
                const float* in = yp + (row * C + c) * kLanes;
                for (int a = 0; a < kLanes; ++a) t[a] += in[a] * Dr[a];
              }
            }
          o = xg;
        }
        for (int64_t a = 0; a < n; ++a) {
          float* row = out_p + (e0 + a) * width;
          for (int64_t c = 0; c < C; ++c)
            for (int64_t j = 0; j < d; ++j) row[col_ptr[l][c] + j] = o[(c * d + j) * kLanes + a];
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("so2_conv_block", &so2_conv_block, "SO(2) convolution messages of a block of edges (float32, inference)");
}
