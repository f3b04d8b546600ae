// The fused Llama layers of lightning_rlhf/models/fast/llama.py and the decode step of decoder.py, as C++
// (lightning_rlhf/models/fast/native.py builds and loads it; llama.NativeLayers is its autograd node):
// `layers_forward` (training, keeping what the backward needs; inference, optionally returning the KV cache),
// `_FusedLayers.backward` and `decode_step`.
// The same ATen operators, called in the same order on the same operands, so every output and gradient is
// bit-identical to the Python twin (tests/unit/test_native.py). What it takes away is the Python
// interpreter between ~1,000 small operators an optimizer step (bench/RESULTS.md, "A C++ trunk").
//
// Weights come as one flat list, 16 entries per layer in `LayerWeights` order (biases may be None):
//   ln1, wq, bq, wk, bk, wv, bv, wo, bo, ln2, wg, bg, wu, bu, wd, bd
#include <torch/extension.h>

#include <tuple>
#include <vector>

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

namespace {

constexpr int64_t kFields = 16;
constexpr int64_t kSaved = 15;  // per layer: x, r1, h1, q, k, v, p, o, x2, r2, h2, s, u, sg, a
enum Field { LN1, WQ, BQ, WK, BK, WV, BV, WO, BO, LN2, WG, BG, WU, BU, WD, BD };

Tensor rows(const Tensor& t) { return t.reshape({-1, t.size(-1)}); }

Tensor rotate(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  return at::addcmul(x * cos, x.roll({x.size(-1) / 2}, {-1}), sin);
}

Tensor rotate_backward(const Tensor& dy, const Tensor& cos, const Tensor& sin) {
  return (dy * sin).roll({dy.size(-1) / 2}, {-1}).add_(dy * cos);
}

// rms_norm(with_rstd=True): (y, rstd)
std::pair<Tensor, Tensor> rms_norm(const Tensor& x, const Tensor& w, double eps) {
  Tensor rstd = x.pow(2).mean({-1}, true).add_(eps).rsqrt_();
  return {x * rstd * w, rstd};
}

std::pair<Tensor, Tensor> rms_norm_backward(const Tensor& dh, const Tensor& x, const Tensor& rstd, const Tensor& w,
                                            bool need_weight) {
  Tensor n = x * rstd;
  Tensor dweight = need_weight ? (dh * n).sum({0}) : Tensor();
  Tensor dn = dh * w;
  Tensor dx = (dn - n * (dn * n).mean({-1}, true)).mul_(rstd);
  return {dx, dweight};
}

// y = x W^T + b on rows: dx (added into `acc` when defined), dW, db
Tensor linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, bool need_w, bool need_b, Tensor acc,
                       Tensor& dw, Tensor& db) {
  if (need_w) dw = dy.t().mm(x);
  if (need_b) db = dy.sum({0});
  return acc.defined() ? acc.addmm_(dy, w) : dy.mm(w);
}

Tensor opt(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

Tensor repeat_heads(const Tensor& t, int64_t group) { return group == 1 ? t : t.repeat_interleave(group, 1); }


}  // namespace

// x (B, L, H) embeddings -> (out (B, n_last, H) before the final norm, extra). mode 0 (training): extra is
// what `backward` needs, 15 tensors a layer; 1 (inference): nothing; 2 (inference): each layer's rotated
// keys and values (B, n_kv, L, D), 2 a layer.
std::pair<Tensor, std::vector<Tensor>> forward(Tensor x, const Tensor& cos, const Tensor& sin, const Tensor& bias,
                                               int64_t n_heads, int64_t n_kv, int64_t head_dim, double scaling,
                                               const std::vector<double>& eps, int64_t n_last,
                                               const std::vector<OptTensor>& flat, int64_t mode) {
  const int64_t n_layers = static_cast<int64_t>(flat.size()) / kFields;
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(flat.size()) == n_layers * kFields,
              "forward: expected 16 weights a layer, got ", flat.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * n_layers, "forward: expected 2 eps a layer, got ", eps.size());
  TORCH_CHECK(mode >= 0 && mode <= 2, "forward: mode is 0, 1 or 2, got ", mode);
  TORCH_CHECK(x.dim() == 3 && n_kv > 0 && n_heads % n_kv == 0 && n_last > 0 && n_last <= x.size(1),
              "forward: x (B, L, H), n_heads a multiple of n_kv, 0 < n_last <= L");
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), group = n_heads / n_kv;
  const bool keep = mode == 0;
  Tensor cos_q = cos * scaling, sin_q = sin * scaling;
  std::vector<Tensor> extra;
  extra.reserve(n_layers * (keep ? kSaved : 2));
  for (int64_t li = 0; li < n_layers; ++li) {
    auto W = [&](Field f) { return opt(flat[li * kFields + f]); };
    const int64_t Lq = li == n_layers - 1 ? n_last : L;
    Tensor h1, r1;
    if (keep) {
      std::tie(h1, r1) = rms_norm(x, W(LN1), eps[2 * li]);
    } else {
      h1 = at::rms_norm(x, {H}, W(LN1), eps[2 * li]);
    }
    Tensor q = at::linear(Lq == L ? h1 : h1.slice(1, L - Lq), W(WQ), flat[li * kFields + BQ]);
    Tensor k = at::linear(h1, W(WK), flat[li * kFields + BK]);
    Tensor v = at::linear(h1, W(WV), flat[li * kFields + BV]);
    q = rotate(q.view({B, Lq, n_heads, head_dim}), cos_q.slice(1, L - Lq), sin_q.slice(1, L - Lq)).transpose(1, 2);
    k = rotate(k.view({B, L, n_kv, head_dim}), cos, sin).transpose(1, 2);
    v = v.view({B, L, n_kv, head_dim}).transpose(1, 2);
    if (mode == 2) {
      extra.push_back(k);
      extra.push_back(v);
    }
    Tensor ke = repeat_heads(k, group), ve = repeat_heads(v, group);
    Tensor p = at::softmax(at::matmul(q, ke.transpose(-1, -2)).add_(bias.slice(2, L - Lq)), -1);
    Tensor o = at::matmul(p, ve).transpose(1, 2).reshape({B, Lq, n_heads * head_dim});
    Tensor x_in = x;
    Tensor x2 = x.slice(1, L - Lq) + at::linear(o, W(WO), flat[li * kFields + BO]);
    Tensor h2, r2;
    if (keep) {
      std::tie(h2, r2) = rms_norm(x2, W(LN2), eps[2 * li + 1]);
    } else {
      h2 = at::rms_norm(x2, {H}, W(LN2), eps[2 * li + 1]);
    }
    Tensor g = at::linear(h2, W(WG), flat[li * kFields + BG]);
    Tensor u = at::linear(h2, W(WU), flat[li * kFields + BU]);
    Tensor s, sg;
    if (keep) {  // sigmoid(g) kept: the backward's silu' then costs three multiplies and adds
      s = at::sigmoid(g);
      sg = g * s;
    } else {
      sg = at::silu(g);
    }
    Tensor a = sg * u;
    x = x2 + at::linear(a, W(WD), flat[li * kFields + BD]);
    if (keep) {
      for (const Tensor& t : {x_in, r1, h1, q, k, v, p, o, x2, r2, h2, s, u, sg, a}) extra.push_back(t);
    }
  }
  return {x, extra};
}

// dy (B, n_last, H) -> (dx (B, L, H), the weights' gradients in `flat` order, undefined where not needed).
std::pair<Tensor, std::vector<Tensor>> backward(Tensor dy, const std::vector<Tensor>& saved, const Tensor& cos,
                                                const Tensor& sin, int64_t n_heads, int64_t n_kv, int64_t head_dim,
                                                double scaling, const std::vector<OptTensor>& flat,
                                                const std::vector<bool>& needs) {
  const int64_t n_layers = static_cast<int64_t>(flat.size()) / kFields;
  TORCH_CHECK(n_layers > 0 && static_cast<int64_t>(flat.size()) == n_layers * kFields &&
                  needs.size() == flat.size() && static_cast<int64_t>(saved.size()) == n_layers * kSaved,
              "backward: expected 16 weights and needs and 15 saved tensors a layer, got ", flat.size(), ", ",
              needs.size(), ", ", saved.size());
  const int64_t group = n_heads / n_kv, B = dy.size(0), H = dy.size(2);
  Tensor cos_q = cos * scaling, sin_q = sin * scaling;
  std::vector<Tensor> grads(flat.size());
  dy = dy.reshape({-1, H});
  for (int64_t li = n_layers - 1; li >= 0; --li) {
    auto W = [&](Field f) { return opt(flat[li * kFields + f]); };
    auto N = [&](Field f) { return static_cast<bool>(needs[li * kFields + f]); };
    auto G = [&](Field f) -> Tensor& { return grads[li * kFields + f]; };
    const Tensor* S = saved.data() + li * kSaved;
    const Tensor &x = S[0], &r1 = S[1], &h1 = S[2], &q = S[3], &k = S[4], &v = S[5], &p = S[6], &o = S[7],
                 &x2 = S[8], &r2 = S[9], &h2 = S[10], &sig = S[11], &u = S[12], &sg = S[13], &a = S[14];
    const int64_t L = x.size(1), Lq = x2.size(1);
    // MLP: x3 = x2 + (silu(gate) * up) Wd^T
    Tensor da = linear_backward(dy, rows(a), W(WD), N(WD), N(BD), Tensor(), G(WD), G(BD));
    Tensor dgate = (da * rows(u)).mul_(at::addcmul(rows(sg), rows(sig), at::rsub(rows(sg), 1)));
    Tensor dup = da.mul_(rows(sg));
    Tensor dh2 = linear_backward(dgate, rows(h2), W(WG), N(WG), N(BG), Tensor(), G(WG), G(BG));
    dh2 = linear_backward(dup, rows(h2), W(WU), N(WU), N(BU), dh2, G(WU), G(BU));
    auto [dx2, dln2] = rms_norm_backward(dh2, rows(x2), rows(r2), W(LN2), N(LN2));
    G(LN2) = dln2;
    dx2 += dy;
    // attention: x2 = x + softmax(q k^T + bias) v Wo^T
    Tensor d_o = linear_backward(dx2, rows(o), W(WO), N(WO), N(BO), Tensor(), G(WO), G(BO));
    d_o = d_o.view({B, Lq, n_heads, head_dim}).transpose(1, 2);
    Tensor ke = repeat_heads(k, group), ve = repeat_heads(v, group);
    Tensor dv = at::matmul(p.transpose(-1, -2), d_o);
    Tensor dp = at::matmul(d_o, ve.transpose(-1, -2));
    Tensor ds = (dp - (dp * p).sum({-1}, true)).mul_(p);
    Tensor dq = at::matmul(ds, ke);
    Tensor dk = at::matmul(ds.transpose(-1, -2), q);
    if (group > 1) {
      dk = dk.view({B, n_kv, group, L, head_dim}).sum({2});
      dv = dv.view({B, n_kv, group, L, head_dim}).sum({2});
    }
    dq = rotate_backward(dq.transpose(1, 2), cos_q.slice(1, L - Lq), sin_q.slice(1, L - Lq))
             .reshape({-1, n_heads * head_dim});
    dk = rotate_backward(dk.transpose(1, 2), cos, sin).reshape({-1, n_kv * head_dim});
    dv = dv.transpose(1, 2).reshape({-1, n_kv * head_dim});
    Tensor h1r = rows(h1);
    Tensor dh1 = linear_backward(dk, h1r, W(WK), N(WK), N(BK), Tensor(), G(WK), G(BK));
    dh1 = linear_backward(dv, h1r, W(WV), N(WV), N(BV), dh1, G(WV), G(BV));
    Tensor h1q = Lq == L ? h1r : rows(h1.slice(1, L - Lq));
    Tensor dh1q = linear_backward(dq, h1q, W(WQ), N(WQ), N(BQ), Lq == L ? dh1 : Tensor(), G(WQ), G(BQ));
    if (Lq != L) dh1.view({B, L, -1}).slice(1, L - Lq) += dh1q.view({B, Lq, -1});
    auto [dx, dln1] = rms_norm_backward(dh1, rows(x), rows(r1), W(LN1), N(LN1));
    G(LN1) = dln1;
    if (Lq == L) {
      dx += dx2;
    } else {
      dx.view({B, L, -1}).slice(1, L - Lq) += dx2.view({B, Lq, -1});
    }
    dy = dx;
  }
  return {dy.view({B, -1, H}), grads};
}

// decoder.decode_step: one token (B,) through every layer, writing its keys and values at cache index i
// (caches (B * n_kv, K, D)) and attending to positions :i + 1 (bias (B * n_kv, 1, i + 1)); cos, sin (B, 1, D).
// `layers`: 10 entries a layer, ln1, w_qkv, b_qkv, wo_t, bo, ln2, w_gu, b_gu, wd_t, bd. -> (B, H) before the
// final norm.
Tensor decode_step(const Tensor& token, const Tensor& embed, const std::vector<OptTensor>& layers,
                   const std::vector<Tensor>& keys, const std::vector<Tensor>& values, const Tensor& bias,
                   const Tensor& cos, const Tensor& sin, int64_t i, int64_t split_qk, int64_t split_v,
                   const std::vector<double>& eps, int64_t nh, int64_t nkv, int64_t d, double scaling) {
  constexpr int64_t kDecode = 10;
  TORCH_CHECK(!keys.empty() && values.size() == keys.size() &&
                  static_cast<int64_t>(layers.size()) == kDecode * static_cast<int64_t>(keys.size()) &&
                  eps.size() == 2 * keys.size(),
              "decode_step: expected 10 weights, 2 eps, a key and a value cache a layer");
  const int64_t B = token.size(0), nq = nh * d, H = embed.size(1);
  Tensor x = at::embedding(embed, token);
  for (size_t li = 0; li < keys.size(); ++li) {
    const OptTensor* w = layers.data() + li * kDecode;
    auto parts = at::linear(at::rms_norm(x, {H}, w[0], eps[2 * li]), w[1].value(), w[2])
                     .split_with_sizes({split_qk, split_v}, -1);
    Tensor qk = rotate(parts[0].view({B, nh + nkv, d}), cos, sin).view({B, -1});
    const Tensor &k_cache = keys[li], &v_cache = values[li];
    k_cache.select(1, i).copy_(qk.slice(1, nq).reshape({B * nkv, d}));
    v_cache.select(1, i).copy_(parts[1].reshape({B * nkv, d}));
    Tensor k_seen = k_cache.slice(1, 0, i + 1), v_seen = v_cache.slice(1, 0, i + 1);
    Tensor scores = at::baddbmm(bias, qk.slice(1, 0, nq).reshape({B * nkv, nh / nkv, d}), k_seen.transpose(1, 2),
                                1, scaling);
    Tensor o = at::bmm(at::softmax(scores, -1), v_seen).view({B, nq});
    x = w[4].has_value() ? at::addmm(x + *w[4], o, w[3].value()) : at::addmm(x, o, w[3].value());
    auto gu = at::linear(at::rms_norm(x, {H}, w[5], eps[2 * li + 1]), w[6].value(), w[7]).chunk(2, -1);
    Tensor a = at::silu(gu[0]) * gu[1];
    x = w[9].has_value() ? at::addmm(x + *w[9], a, w[8].value()) : at::addmm(x, a, w[8].value());
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "the fused Llama layers' forward (training or inference)");
  m.def("backward", &backward, "the fused Llama layers' backward");
  m.def("decode_step", &decode_step, "one decode step of the Llama layers with a KV cache");
}
