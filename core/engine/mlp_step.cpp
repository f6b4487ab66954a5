// Training steps of S copies of a plain MLP on the CPU, copy after copy: each copy's forward
// pass, backward pass, gradient (or DP-SGD's clipped sum) and Adam step, for each of its
// steps in turn, in one call.
//
// fedcore.engine.native builds this file with torch.utils.cpp_extension and calls it as
// torch.ops.fedcore_native.mlp_steps. It computes what the written-out steps of
// fedcore.engine.vectorized_step (make_mlp_train_step, make_mlp_dp_step) compute, to float
// rounding: the same formulas, without ~35 tensor operations a step over all copies (each
// a pass through memory and an allocation) and without the copy of every layer's gradient
// into the (S, P) rows -- a copy's gradient is written in place. With Adam inside, a call
// takes many steps of each copy (an epoch, or a block of one), a copy's steps one after
// another: its parameters and Adam's moments stay in the core's cache between them, and the
// caller's Python runs once a call, not once a step. The matrix products are on one copy's
// matrices, which stay in the core's cache between the layers: libxsmm's JIT kernels, made for
// each product's shapes, where the build found libxsmm (FEDCORE_LIBXSMM defined; ~1.4x MKL's
// throughput at these sizes, docs/speed.md), else BLAS calls (MKL's sgemm_/dgemm_, which
// torch's CPU wheels export).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "native.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstddef>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef FEDCORE_LIBXSMM
#include <libxsmm.h>
#endif

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
}

namespace {

// Column-major BLAS on row-major matrices: a row-major (r x c) matrix is its column-major transpose.
void gemm(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float beta, float* c,
          int ldc) {
  const float one = 1.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}
void gemm(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb, double beta,
          double* c, int ldc) {
  const double one = 1.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
}

#ifdef FEDCORE_LIBXSMM
template <typename T>
using Kernel = std::conditional_t<std::is_same_v<T, float>, libxsmm_smmfunction, libxsmm_dmmfunction>;
// Products up to this many multiply-adds get a libxsmm kernel (its JIT code has no cache
// blocking; past 128^3 BLAS's blocked kernels are the faster ones).
constexpr int64_t kSmallProduct = int64_t(128) * 128 * 128;
#endif

// One matrix product C = A op(B) (+ C where beta is 1) of fixed shapes (column-major,
// alpha 1; op transposes B where tb is 'T'): libxsmm's kernel for them where the build has libxsmm and
// the product is small, else BLAS. Either way a product's rounding depends on its shapes
// only: libxsmm's kernel is the same code at any alignment, and BLAS's output goes through
// an aligned buffer where it matters (run, below).
template <typename T>
struct Product {
  char tb;
  int m, n, k, lda, ldb, ldc;
  T beta;
#ifdef FEDCORE_LIBXSMM
  Kernel<T> kernel = nullptr;
#endif

  static Product make(char tb, int m, int n, int k, int lda, int ldb, int ldc, T beta = T(0)) {
    Product p{tb, m, n, k, lda, ldb, ldc, beta};
#ifdef FEDCORE_LIBXSMM
    if (static_cast<int64_t>(m) * n * k <= kSmallProduct) {
      const T alpha = 1;
      const int flags = tb == 'T' ? LIBXSMM_GEMM_FLAG_TRANS_B : LIBXSMM_GEMM_FLAG_NONE;
      const int prefetch = LIBXSMM_PREFETCH_NONE;
      if constexpr (std::is_same_v<T, float>) {
        p.kernel = libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, &prefetch);
      } else {
        p.kernel = libxsmm_dmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &flags, &prefetch);
      }
    }
#endif
    return p;
  }
  // Whether libxsmm computes it (its output need not go through an aligned buffer).
  bool jit() const {
#ifdef FEDCORE_LIBXSMM
    return kernel != nullptr;
#else
    return false;
#endif
  }
  void operator()(const T* a, const T* b, T* c) const {
#ifdef FEDCORE_LIBXSMM
    if (kernel != nullptr) {
      kernel(a, b, c);
      return;
    }
#endif
    gemm('N', tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
};

// out (n x m, column-major) = in (m x n, column-major) transposed: libxsmm's kernel (~4x the
// plain loop at 32 x 128) where the build has it.
template <typename T>
void transpose(const T* in, int64_t m, int64_t n, T* out) {
#ifdef FEDCORE_LIBXSMM
  libxsmm_otrans(out, in, sizeof(T), m, n, m, n);
#else
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) out[i * n + j] = in[j * m + i];
#endif
}

// out[j] += sum over rows i of m[i * cols + j] (or of its square), row-major m, the rows in
// order: the same sums as the plain double loop, with each block of kLanes sums held in a
// register across the rows (the plain loop stores and reloads out for every row, a chain
// through memory). m may be read up to kLanes - 1 values past its end.
constexpr int64_t kLanes = 16;
template <bool kSquare = false, typename T>
__attribute__((always_inline)) inline void add_column_sums(const T* m, int64_t rows, int64_t cols, T* out) {
  for (int64_t j0 = 0; j0 < cols; j0 += kLanes) {
    const int64_t n = std::min(kLanes, cols - j0);
    T acc[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) acc[k] = k < n ? out[j0 + k] : T(0);
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = m + i * cols + j0;
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) acc[k] += k < n ? (kSquare ? row[k] * row[k] : row[k]) : T(0);
    }
    for (int64_t k = 0; k < n; ++k) out[j0 + k] = acc[k];
  }
}

// Asks for the cache lines of the given rows of x (F values each), to be read a step later:
// a copy's rows lie at random in its data (megabytes), and gathering them waits on memory.
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const T* x, int64_t F, const int64_t* rows, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const char* first = reinterpret_cast<const char*>(x + rows[i] * F);
    const char* last = reinterpret_cast<const char*>(x + (rows[i] + 1) * F) - 1;
    for (const char* line = first; line <= last; line += 64) __builtin_prefetch(line, 0, 2);
    __builtin_prefetch(last, 0, 2);
  }
}

// DP-SGD's noise drawn inside the step: each copy's stream (positioned where the caller's
// Python stream stands, advanced by each draw) and standard deviation.
struct Noise {
#ifdef FEDCORE_OPENSSL
  std::vector<std::unique_ptr<fedcore::NoiseStream>> streams;
#endif
  std::vector<double> std;
};

template <typename T>
inline void draw_noise(const Noise& noise, int64_t s, T* out, int64_t P) {
#ifdef FEDCORE_OPENSSL
  noise.streams[s]->draw(out, P, static_cast<T>(noise.std[s]));
#endif
}

enum Activation : int64_t { kNone = 0, kRelu = 1, kTanh = 2 };

// One nn.Linear: where its weight (out x in, row-major) and bias live in a copy's row of P
// numbers, its sizes, and the activation after it.
struct Layer {
  int64_t weight, bias, in, out, activation;
};

// A copy's matrix products at a batch of b rows, per layer: the forward pass on
// feature-major activations (z' = a' W^T: a' is b x in column-major, W's row-major
// out x in is the column-major in x out W^T); the gradient below a layer (W^T d', batch-major:
// in x b column-major); the weights' gradient (a'' d''^T with a and d batch-major: the
// column-major in x out matrix that a row-major weight is), and the same added into C
// (DP-SGD's clipped sum into the noise). Each is A op(B) with A untransposed, which
// libxsmm's kernels compute.
template <typename T>
struct Products {
  std::vector<Product<T>> forward, below, weight, added;

  Products(const std::vector<Layer>& layers, int64_t b) {
    const int w = static_cast<int>(b);
    for (const Layer& ly : layers) {
      const int in = static_cast<int>(ly.in), out = static_cast<int>(ly.out);
      forward.push_back(Product<T>::make('N', w, out, in, w, in, w));
      below.push_back(Product<T>::make('N', in, w, out, in, out, in));
      weight.push_back(Product<T>::make('T', in, out, w, in, out, in));
      added.push_back(Product<T>::make('T', in, out, w, in, out, in, T(1)));
    }
  }
};

// Each batch width's products for the layers of the last call, made on first use (a DP-SGD
// step's copies have batches of different widths).
template <typename T>
class ProductCache {
 public:
  const Products<T>& at(const std::vector<Layer>& layers, int64_t b) {
    const auto same = [](const Layer& l, const std::pair<int64_t, int64_t>& s) { return l.in == s.first && l.out == s.second; };
    if (layers.size() != shapes_.size() || !std::equal(layers.begin(), layers.end(), shapes_.begin(), same)) {
      shapes_.clear();
      for (const Layer& l : layers) shapes_.emplace_back(l.in, l.out);
      by_width_.clear();
    }
    if (static_cast<int64_t>(by_width_.size()) <= b) by_width_.resize(b + 1);
    if (by_width_[b] == nullptr) by_width_[b] = std::make_unique<Products<T>>(layers, b);
    return *by_width_[b];
  }

 private:
  std::vector<std::pair<int64_t, int64_t>> shapes_;
  std::vector<std::unique_ptr<Products<T>>> by_width_;
};

// Scratch buffers hold kAlign extra elements so that their first 64-byte aligned element
// leaves room for P values.
constexpr int64_t kAlign = 64;
template <typename T>
T* aligned(T* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((address + 63) & ~static_cast<std::uintptr_t>(63));
}

// Copy s's row at step t of an (S, T, B) argument (any strides between copies and steps,
// rows contiguous), or its value at step t of an (S, T) one.
template <typename T>
const T* row_of(const at::Tensor& t, int64_t s, int64_t step) {
  return t.data_ptr<T>() + s * t.stride(0) + step * t.stride(1);
}

// Adam's step for one copy once its gradient is complete, while its rows are in cache: the
// arithmetic of the vectorized loop of torch's fused CPU Adam (at::_fused_adam_, no amsgrad,
// not maximizing), in the same order and precision, with the fused multiply-adds its build
// makes of it (the lerp of the first moment, the second moment's sum, the weight decay), so
// the parameters round as there (torch's few scalar tail elements round without them).
// (Inlined into each instruction set's clone of run, where it vectorizes.)
struct Adam {
  at::Tensor exp_avg, exp_avg_sq;
  double lr, beta1, beta2, weight_decay, eps;
  const int64_t* taken;  // (S,) each copy's Adam steps before the call
};

// Copy s's Adam step number `step` (counting from 1).
template <typename T>
__attribute__((always_inline)) inline void adam_row(const Adam& o, int64_t s, int64_t P, int64_t step, T* param,
                                                    const T* grad) {
  T* m = o.exp_avg.data_ptr<T>() + s * P;
  T* v = o.exp_avg_sq.data_ptr<T>() + s * P;
  const double bias_correction1 = 1 - std::pow(o.beta1, static_cast<double>(step));
  const double bias_correction2 = 1 - std::pow(o.beta2, static_cast<double>(step));
  const T minus_step = static_cast<T>(-(o.lr / bias_correction1)), b2 = static_cast<T>(o.beta2);
  const T c1 = static_cast<T>(1 - o.beta1), c2 = static_cast<T>(1 - o.beta2), wd = static_cast<T>(o.weight_decay);
  const T root2 = static_cast<T>(std::sqrt(bias_correction2)), eps = static_cast<T>(o.eps);
  // float32: sqrt(v) / root2 as one double product with root2's reciprocal, rounded to float.
  // It rounds exactly as the float division (x / b of two floats lies more than 2^-49 of
  // itself from any midpoint of two floats, or on a float; the double product is within
  // 2^-52 of it), and spares the divider, which the square root and the other division keep
  // busy: Adam's three divider operations are its cost on these cores (tested exhaustively
  // over step counts in test_engine_native.py).
  const double over_root2 = 1.0 / static_cast<double>(root2);
  const bool decay = o.weight_decay != 0;
  for (int64_t d = 0; d < P; ++d) {
    T g = grad[d];
    if (decay) g = std::fma(param[d], wd, g);
    m[d] = std::fma(c1, g - m[d], m[d]);  // exp_avg.lerp_(grad, 1 - beta1), weight below 0.5
    v[d] = std::fma(c2 * g, g, v[d] * b2);
    T scaled;
    if constexpr (std::is_same_v<T, float>) {
      scaled = static_cast<float>(static_cast<double>(std::sqrt(v[d])) * over_root2);
    } else {
      scaled = std::sqrt(v[d]) / root2;
    }
    param[d] = param[d] + minus_step * m[d] / (scaled + eps);
  }
}

template <typename T>
FEDCORE_CLONES void run(const at::Tensor& params, const at::Tensor& x_all, const at::Tensor& index, const at::Tensor& y,
         const at::Tensor& w, const std::vector<Layer>& layers, at::Tensor& out, at::Tensor& losses,
         const at::Tensor* clip, const at::Tensor* row_scale, const at::Tensor* sizes, const int64_t* steps,
         const Adam* adam, const Noise* noise) {
  const int64_t S = index.size(0), T_ = index.size(1), B = index.size(2), P = params.size(1), F = x_all.size(1);
  const int64_t L = static_cast<int64_t>(layers.size());
  const int64_t C = layers.back().out;
  // Scratch, reused across calls: every layer's input (x's rows first) and the logits,
  // batch-major (rows) and feature-major (columns: the forward products' operands); every
  // layer's output gradient; the per-row norms and clip factors.
  thread_local std::vector<T> acts, columns, deltas, norms, factor;
  thread_local ProductCache<T> products;
  // A copy's weights' gradients from BLAS are written through this 64-byte aligned buffer:
  // MKL's matmuls round their output differently at different alignments of it, and a copy's
  // row of the (S, P) buffers is aligned by its index (P is rarely a multiple of 16), so
  // without it a copy's numbers would depend on which copies train beside it (the run's
  // grouping). Their inputs' alignment does not change their sums (MKL packs them first;
  // checked for float32 and float64 over several layer widths and batch sizes, and by the
  // tests), so the parameters are read in place. (libxsmm's kernels round the same at any
  // alignment: they write in place.)
  thread_local std::vector<T> grad_buffer, noise_buffer;
  grad_buffer.resize(P + kAlign);
  T* const ga = aligned(grad_buffer.data());
  // DP-SGD drawing its own noise: each step's noise and clipped sum, read by Adam in cache.
  if (noise != nullptr) noise_buffer.resize(P + kAlign);
  T* const na = noise != nullptr ? aligned(noise_buffer.data()) : nullptr;
  std::vector<int64_t> act_at(L + 1), delta_at(L + 1);
  act_at[0] = 0;
  delta_at[0] = 0;
  for (int64_t l = 0; l < L; ++l) {
    act_at[l + 1] = act_at[l] + B * layers[l].in;
    delta_at[l + 1] = delta_at[l] + B * layers[l].out;
  }
  acts.resize(act_at[L] + B * C);
  columns.resize(act_at[L] + B * C + kLanes);  // (+ kLanes: add_column_sums may read past the end)
  deltas.resize(delta_at[L] + kLanes);
  norms.resize(B);
  factor.resize(B);
  const T* x = x_all.data_ptr<T>();
  T* loss_out = losses.data_ptr<T>();
  // Copy after copy, each copy's steps one after another: its parameters, Adam's moments and
  // its rows stay in the core's cache from one step to the next. (Copies are independent:
  // the order changes no number.) Parameters are read through a const pointer until Adam
  // writes them, step by step.
  for (int64_t s = 0; s < S; ++s) {
    T* const param = params.data_ptr<T>() + s * P;
    const T* p = param;
    const int64_t own_steps = steps == nullptr ? T_ : std::clamp<int64_t>(steps[s], 0, T_);
    for (int64_t t = 0; t < own_steps; ++t) {
      // The gradient: the caller's row of out (step t's (S, P) slice), or (a plain step with
      // Adam and no out) the aligned scratch itself, which Adam reads while it is in cache,
      // or (DP-SGD drawing its noise) the copy's noise, drawn now, into which its clipped sum goes.
      T* g = out.defined() ? out.data_ptr<T>() + t * out.stride(0) + s * out.stride(1) : noise != nullptr ? na : ga;
      if (noise != nullptr) draw_noise(*noise, s, g, P);
      const int64_t* rows = row_of<int64_t>(index, s, t);
      const int64_t* labels = row_of<int64_t>(y, s, t);
      const T* weight = row_of<T>(w, s, t);
      const int64_t step_number = adam == nullptr ? 0 : adam->taken[s] + t + 1;
      // Rows past a copy's own count are padding (weight 0, contributing exact zeros): skipped.
      const int64_t b = sizes == nullptr ? B : std::clamp<int64_t>(*row_of<int64_t>(*sizes, s, t), 0, B);
      if (b == 0) {
        loss_out[s * T_ + t] = 0;
        if (clip == nullptr) {
          for (const Layer& ly : layers) {
            std::fill(g + ly.weight, g + ly.weight + ly.in * ly.out, T(0));
            std::fill(g + ly.bias, g + ly.bias + ly.out, T(0));
          }
        }
        if (adam != nullptr) adam_row(*adam, s, P, step_number, param, g);
        continue;
      }
      const Products<T>& pr = products.at(layers, b);
      for (int64_t i = 0; i < b; ++i) std::copy(x + rows[i] * F, x + (rows[i] + 1) * F, acts.data() + i * F);
      if (t + 1 < own_steps) {
        const int64_t next = sizes == nullptr ? B : std::clamp<int64_t>(*row_of<int64_t>(*sizes, s, t + 1), 0, B);
        prefetch_rows(x, F, row_of<int64_t>(index, s, t + 1), next);
      }
      transpose(acts.data(), F, b, columns.data());
      // Forward: z' = a' W^T on the feature-major activations, then + b and the activation,
      // then the result batch-major too (the backward pass's operands), layer after layer.
      for (int64_t l = 0; l < L; ++l) {
        const Layer& ly = layers[l];
        T* z = columns.data() + act_at[l + 1];
        pr.forward[l](columns.data() + act_at[l], p + ly.weight, z);
        const T* bias = p + ly.bias;
        for (int64_t j = 0; j < ly.out; ++j) {
          T* zj = z + j * b;
          const T bj = bias[j];
          if (ly.activation == kRelu) {
            for (int64_t i = 0; i < b; ++i) zj[i] = std::max(zj[i] + bj, T(0));
          } else if (ly.activation == kTanh) {
            for (int64_t i = 0; i < b; ++i) zj[i] = std::tanh(zj[i] + bj);
          } else {
            for (int64_t i = 0; i < b; ++i) zj[i] += bj;
          }
        }
        transpose(z, b, ly.out, acts.data() + act_at[l + 1]);
      }
      // The weighted negative log-likelihood and its gradient at the logits, w_i (softmax - onehot).
      const T* logits = acts.data() + act_at[L];
      T* d = deltas.data() + delta_at[L - 1];
      T loss = 0;
      for (int64_t i = 0; i < b; ++i) {
        const T* zi = logits + i * C;
        T top = zi[0];
        for (int64_t c = 1; c < C; ++c) top = std::max(top, zi[c]);
        T total = 0;
        for (int64_t c = 0; c < C; ++c) total += std::exp(zi[c] - top);
        const T lse = top + std::log(total);
        const int64_t yi = labels[i];
        for (int64_t c = 0; c < C; ++c) d[i * C + c] = std::exp(zi[c] - lse) * weight[i] - (c == yi ? weight[i] : T(0));
        loss -= weight[i] * (zi[yi] - lse);
      }
      loss_out[s * T_ + t] = loss;
      // Backward: each layer's output gradient from the next one's (through its weights and
      // the activation's derivative at its output); the plain step takes each layer's gradient
      // on the way, DP-SGD keeps them for the clip factors.
      for (int64_t l = L - 1; l >= 0; --l) {
        const Layer& ly = layers[l];
        const T* a = acts.data() + act_at[l];
        d = deltas.data() + delta_at[l];
        if (clip == nullptr) {
          const Product<T>& weight = pr.weight[l];  // d^T a
          if (weight.jit()) {
            weight(a, d, g + ly.weight);
          } else {
            weight(a, d, ga + ly.weight);
            if (g != ga) std::copy(ga + ly.weight, ga + ly.weight + ly.in * ly.out, g + ly.weight);
          }
          T* gb = g + ly.bias;
          std::fill(gb, gb + ly.out, T(0));
          add_column_sums(d, b, ly.out, gb);
        }
        if (l == 0) break;
        T* below = deltas.data() + delta_at[l - 1];
        pr.below[l](p + ly.weight, d, below);  // d W
        const int64_t act = layers[l - 1].activation;
        if (act == kRelu) {
          for (int64_t j = 0; j < b * ly.in; ++j) below[j] = a[j] > T(0) ? below[j] : T(0);
        } else if (act == kTanh) {
          for (int64_t j = 0; j < b * ly.in; ++j) below[j] *= T(1) - a[j] * a[j];
        }
      }
      if (clip == nullptr) {
        if (adam != nullptr) adam_row(*adam, s, P, step_number, param, g);
        continue;
      }
      // DP-SGD: row i's squared gradient norm is sum over layers of |d_i|^2 (|a_i|^2 + 1) (weight
      // and bias); Opacus's clip factor min(1, C / (norm + 1e-6)) times the row's scale; the
      // clipped sum (factor * d)^T a of each layer is added into `out`.
      // (|a_i|^2 from the feature-major activations: a vector of rows at a time.)
      std::fill(norms.begin(), norms.end(), T(0));
      for (int64_t l = 0; l < L; ++l) {
        const Layer& ly = layers[l];
        const T* column = columns.data() + act_at[l];
        const T* dl = deltas.data() + delta_at[l];
        std::fill(factor.begin(), factor.begin() + b, T(0));  // |a_i|^2, before it is the factor
        add_column_sums<true>(column, ly.in, b, factor.data());
        for (int64_t i = 0; i < b; ++i) {
          T dd = 0;
  #pragma omp simd reduction(+ : dd)
          for (int64_t j = 0; j < ly.out; ++j) dd += dl[i * ly.out + j] * dl[i * ly.out + j];
          norms[i] += dd * (factor[i] + T(1));
        }
      }
      const T bound = clip->data_ptr<T>()[s];
      const T* scale = row_of<T>(*row_scale, s, t);
      for (int64_t i = 0; i < b; ++i) factor[i] = std::min(bound / (std::sqrt(norms[i]) + T(1e-6)), T(1)) * scale[i];
      for (int64_t l = 0; l < L; ++l) {
        const Layer& ly = layers[l];
        T* dl = deltas.data() + delta_at[l];
        for (int64_t i = 0; i < b; ++i)
          for (int64_t j = 0; j < ly.out; ++j) dl[i * ly.out + j] *= factor[i];
        // The layer's clipped sum added into the noise: by libxsmm's kernel, which starts from
        // the noise; else the sum through the aligned buffer, then added (MKL's output rounds
        // by its alignment).
        T* gw = g + ly.weight;
        if (pr.added[l].jit()) {
          pr.added[l](acts.data() + act_at[l], dl, gw);
        } else {
          T* sum = ga + ly.weight;
          pr.weight[l](acts.data() + act_at[l], dl, sum);
  #pragma omp simd
          for (int64_t j = 0; j < ly.in * ly.out; ++j) gw[j] += sum[j];
        }
        add_column_sums(dl, b, ly.out, g + ly.bias);
      }
      if (adam != nullptr) adam_row(*adam, s, P, step_number, param, g);
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t S, int64_t T, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == S && t.size(1) == T && t.size(2) == B, name, " must be (S, T, B)");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(B <= 1 || t.stride(2) == 1, name, "'s rows must be contiguous");
}

void check_copies(const std::optional<at::Tensor>& t, const char* name, int64_t S) {
  TORCH_CHECK(!t.has_value() || (t->dim() == 1 && t->size(0) == S && t->scalar_type() == at::kLong && t->is_contiguous()),
              name, " must be (S,) int64");
}

// T steps of S copies, copy after copy (each copy's steps in order).
// params (S, P) contiguous; x_all (N, F) contiguous; index, y (S, T, B) int64 (row ids into
// x_all, labels; rows contiguous); w (S, T, B) row weights (0 on padding); layers: [weight
// offset, bias offset, in, out, activation] per layer; out (T, S, P), rows contiguous: the
// gradients (plain step, T = 1, overwritten; may be absent when Adam runs inside, which then
// reads each gradient from cache) or the buffers each step's clipped sums are added to
// (DP-SGD, clip (S,) and row_scale (S, T, B) given); sizes (S, T) int64, optional: each
// copy's step computes only its first sizes[s, t] rows (the rest are padding); steps (S,)
// int64, optional: copy s takes only its first steps[s] steps (the losses of the others are
// 0); adam [lr, beta1, beta2, weight_decay, eps] (empty: none) with exp_avg, exp_avg_sq (S, P)
// and taken (S,) int64, each copy's Adam steps before the call: each copy's Adam step right
// after each gradient, updating params in place -- the only way to take more than one step
// in a call; noise_keys (S, 16) uint8, noise_at (S,) int64 and noise_std (S values): DP-SGD
// drawing its own noise (no out; Adam inside; a build with OpenSSL): copy s's noise at each step
// it takes is the next draw of fedcore.noise.GaussianNoise's stream under key s, from byte
// noise_at[s] of its keystream on (advanced in place), at standard deviation noise_std[s].
// Returns every copy's loss at every step, sum_i w_i nll_i, (S, T).
at::Tensor mlp_steps(const at::Tensor& params, const at::Tensor& x_all, const at::Tensor& index, const at::Tensor& y,
                     const at::Tensor& w, at::IntArrayRef layers, const std::optional<at::Tensor>& out_arg,
                     const std::optional<at::Tensor>& clip, const std::optional<at::Tensor>& row_scale,
                     const std::optional<at::Tensor>& sizes, const std::optional<at::Tensor>& steps,
                     const std::optional<at::Tensor>& exp_avg, const std::optional<at::Tensor>& exp_avg_sq,
                     const std::optional<at::Tensor>& taken, at::ArrayRef<double> adam,
                     const std::optional<at::Tensor>& noise_keys, const std::optional<at::Tensor>& noise_at,
                     at::ArrayRef<double> noise_std) {
  const auto dtype = params.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "mlp_steps runs float32 or float64");
  TORCH_CHECK(params.device().is_cpu() && params.dim() == 2 && params.is_contiguous(), "params must be (S, P), contiguous");
  TORCH_CHECK(x_all.dim() == 2 && x_all.scalar_type() == dtype && x_all.is_contiguous(), "x_all must be (N, F), contiguous");
  TORCH_CHECK(index.dim() == 3, "index must be (S, T, B)");
  const int64_t S = params.size(0), T = index.size(1), B = index.size(2), P = params.size(1);
  // No out: a plain step whose Adam runs inside, whose gradients the caller does not need.
  const bool draws = noise_keys.has_value();
  TORCH_CHECK(out_arg.has_value() || (!clip.has_value() && !adam.empty()) || draws,
              "out is needed, except by a plain step with Adam or a DP-SGD step drawing its noise");
  TORCH_CHECK(!draws || (!out_arg.has_value() && clip.has_value() && !adam.empty() && noise_at.has_value()),
              "a step drawing its noise is DP-SGD with Adam inside, noise_at given and no out");
  TORCH_CHECK(T <= 1 || !adam.empty(), "more than one step in a call needs Adam inside");
  at::Tensor out = out_arg.has_value() ? *out_arg : at::Tensor();
  TORCH_CHECK(!out.defined() || (out.dim() == 3 && out.size(0) == T && out.size(1) == S && out.size(2) == P &&
                                 out.scalar_type() == dtype && out.stride(2) == 1),
              "out must be (T, S, P) like params, rows contiguous");
  TORCH_CHECK(!out.defined() || clip.has_value() || T == 1, "a plain step's gradients are written for one step");
  TORCH_CHECK(layers.size() >= 5 && layers.size() % 5 == 0, "layers must hold 5 numbers per layer");
  check_rows(index, "index", S, T, B, at::kLong);
  check_rows(y, "y", S, T, B, at::kLong);
  check_rows(w, "w", S, T, B, dtype);
  TORCH_CHECK(clip.has_value() == row_scale.has_value(), "clip and row_scale go together");
  if (clip.has_value()) {
    TORCH_CHECK(clip->dim() == 1 && clip->size(0) == S && clip->scalar_type() == dtype && clip->is_contiguous(),
                "clip must be (S,)");
    check_rows(*row_scale, "row_scale", S, T, B, dtype);
  }
  if (sizes.has_value()) {
    TORCH_CHECK(sizes->dim() == 2 && sizes->size(0) == S && sizes->size(1) == T && sizes->scalar_type() == at::kLong,
                "sizes must be (S, T) int64");
  }
  check_copies(steps, "steps", S);
  std::vector<Layer> ls;
  for (size_t i = 0; i < layers.size(); i += 5) {
    Layer l{layers[i], layers[i + 1], layers[i + 2], layers[i + 3], layers[i + 4]};
    TORCH_CHECK(l.weight >= 0 && l.bias >= 0 && l.weight + l.in * l.out <= params.size(1) && l.bias + l.out <= params.size(1),
                "layer ", i / 5, " lies outside the parameter rows");
    TORCH_CHECK(ls.empty() ? l.in == x_all.size(1) : l.in == ls.back().out, "layer ", i / 5, "'s input size");
    ls.push_back(l);
  }
  const int64_t* own_steps = steps.has_value() ? steps->data_ptr<int64_t>() : nullptr;
  // Row ids and labels are checked here: nothing may throw inside run (its clones for each
  // instruction set cannot pass an exception on).
  const int64_t N = x_all.size(0), C = ls.back().out;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = own_steps == nullptr ? T : std::clamp<int64_t>(own_steps[s], 0, T);
    for (int64_t t = 0; t < n; ++t) {
      const int64_t b = sizes.has_value() ? std::clamp<int64_t>(*row_of<int64_t>(*sizes, s, t), 0, B) : B;
      const int64_t* rows = row_of<int64_t>(index, s, t);
      const int64_t* labels = row_of<int64_t>(y, s, t);
      for (int64_t i = 0; i < b; ++i) {
        TORCH_CHECK(rows[i] >= 0 && rows[i] < N, "row id ", rows[i], " out of range for ", N, " rows");
        TORCH_CHECK(labels[i] >= 0 && labels[i] < C, "label ", labels[i], " out of range for ", C, " classes");
      }
    }
  }
  auto losses = at::zeros({S, T}, params.options());
  if (S == 0 || T == 0) return losses;
  const at::Tensor* c = clip.has_value() ? &*clip : nullptr;
  const at::Tensor* r = row_scale.has_value() ? &*row_scale : nullptr;
  const at::Tensor* n = sizes.has_value() ? &*sizes : nullptr;
  std::optional<Adam> optimizer;
  if (!adam.empty()) {
    TORCH_CHECK(adam.size() == 5, "adam must be [lr, beta1, beta2, weight_decay, eps]");
    TORCH_CHECK(exp_avg.has_value() && exp_avg_sq.has_value() && taken.has_value(), "adam needs exp_avg, exp_avg_sq and taken");
    for (const at::Tensor* t : {&*exp_avg, &*exp_avg_sq}) {
      TORCH_CHECK(t->sizes() == params.sizes() && t->scalar_type() == dtype && t->is_contiguous(),
                  "Adam's moments must be contiguous and like params");
    }
    check_copies(taken, "taken", S);
    const int64_t* before = taken->data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s) TORCH_CHECK(before[s] >= 0, "Adam's step counts cannot be negative");
    optimizer = Adam{*exp_avg, *exp_avg_sq, adam[0], adam[1], adam[2], adam[3], adam[4], before};
  }
  const Adam* o = optimizer.has_value() ? &*optimizer : nullptr;
  std::optional<Noise> noise;
  if (draws) {
#ifdef FEDCORE_OPENSSL
    TORCH_CHECK(noise_keys->dim() == 2 && noise_keys->size(0) == S && noise_keys->size(1) == 16 &&
                    noise_keys->scalar_type() == at::kByte && noise_keys->is_contiguous(),
                "noise_keys must be (S, 16) uint8, contiguous");
    check_copies(noise_at, "noise_at", S);
    TORCH_CHECK(static_cast<int64_t>(noise_std.size()) == S, "noise_std must hold one standard deviation per copy");
    TORCH_CHECK(P < (int64_t(1) << 28), "a row of ", P, " values is too long to draw in one call to OpenSSL");
    noise.emplace();
    noise->std.assign(noise_std.begin(), noise_std.end());
    int64_t* at = noise_at->data_ptr<int64_t>();
    for (int64_t s = 0; s < S; ++s) {
      TORCH_CHECK(at[s] >= 0, "a stream's position cannot be negative");
      noise->streams.push_back(std::make_unique<fedcore::NoiseStream>(noise_keys->data_ptr<uint8_t>() + 16 * s, at + s));
      TORCH_CHECK(noise->streams.back()->ok(), "OpenSSL could not start AES-128-CTR for noise stream ", s);
    }
#else
    TORCH_CHECK(false, "this build draws no noise: OpenSSL's libcrypto was not found when it was built");
#endif
  }
  const Noise* z = noise.has_value() ? &*noise : nullptr;
  if (dtype == at::kFloat) {
    run<float>(params, x_all, index, y, w, ls, out, losses, c, r, n, own_steps, o, z);
  } else {
    run<double>(params, x_all, index, y, w, ls, out, losses, c, r, n, own_steps, o, z);
  }
  return losses;
}

// Which library computes the step's matrix products: libxsmm's version and the instruction
// set its kernels are made for, or BLAS.
std::string matmul_library() {
#ifdef FEDCORE_LIBXSMM
  libxsmm_init();
  return std::string("libxsmm ") + LIBXSMM_CONFIG_VERSION + " (" + libxsmm_get_target_arch() + ")";
#else
  return "BLAS";
#endif
}

}  // namespace

TORCH_LIBRARY(fedcore_native, m) {
  m.def(
      "mlp_steps(Tensor(a!) params, Tensor x_all, Tensor index, Tensor y, Tensor w, int[] layers, Tensor(b!)? out, "
      "Tensor? clip, Tensor? row_scale, Tensor? sizes, Tensor? steps, Tensor(c!)? exp_avg, Tensor(d!)? exp_avg_sq, "
      "Tensor? taken, float[] adam, Tensor? noise_keys=None, Tensor(e!)? noise_at=None, float[] noise_std=[]) -> Tensor");
  m.def("matmul_library() -> str", matmul_library);
}

TORCH_LIBRARY_IMPL(fedcore_native, CPU, m) { m.impl("mlp_steps", mlp_steps); }
