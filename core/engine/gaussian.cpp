// The Box-Muller transform of fedcore.noise.GaussianNoise in one pass per row: from a row's
// AES-CTR keystream (2 ceil(P/2) 32-bit words) to its P Gaussian values, with the same
// formulas, order of operations and precision as the numpy ufuncs there, log, sin and cos
// from glibc's vector math library (libmvec, up to 4 ulp; numpy's own are of the same
// accuracy, so values differ from the numpy path only in their last bits). fedcore.engine.native
// builds it beside mlp_step.cpp (with -fno-builtin-sin/cos, which keeps GCC from merging
// them into a scalar sincos, and -lmvec).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "native.h"

#include <cmath>
#include <cstdint>
#include <vector>

// glibc declares these SIMD variants only under -ffast-math, which this build does not use.
extern "C" {
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
float sinf(float);
#pragma omp declare simd notinbranch
float cosf(float);
#pragma omp declare simd notinbranch
double log(double);
#pragma omp declare simd notinbranch
double sin(double);
#pragma omp declare simd notinbranch
double cos(double);
}

namespace {

inline float vlog(float x) { return logf(x); }
inline double vlog(double x) { return log(x); }
inline float vsin(float x) { return sinf(x); }
inline double vsin(double x) { return sin(x); }
inline float vcos(float x) { return cosf(x); }
inline double vcos(double x) { return cos(x); }

// Row r of out (P values) from its keystream k (k1 = k[0, h), k2 = k[h, 2h)), std s:
// radius sqrt(-2 s^2 ln((k1 + 1) / 2^32)), angle 2 pi k2 / 2^32; cosines first, then sines
// (the last sine dropped when P is odd).
template <typename T>
FEDCORE_CLONES void transform(const uint32_t* k, T* out, int64_t P, T s) {
  const int64_t h = (P + 1) / 2, rest = P - h;
  const T scale = static_cast<T>(1.0 / 4294967296.0);
  const T angle = static_cast<T>(2.0 * M_PI / 4294967296.0);
  const T c = static_cast<T>(-2.0) * s * s;
  const uint32_t* k2 = k + h;
#pragma omp simd
  for (int64_t j = 0; j < rest; ++j) {
    const T radius = std::sqrt(vlog((static_cast<T>(k[j]) + T(1)) * scale) * c);
    const T a = static_cast<T>(k2[j]) * angle;
    out[h + j] = vsin(a) * radius;
    out[j] = radius * vcos(a);
  }
  for (int64_t j = rest; j < h; ++j) {  // the unpaired last cosine (P odd)
    const T radius = std::sqrt(vlog((static_cast<T>(k[j]) + T(1)) * scale) * c);
    out[j] = radius * vcos(static_cast<T>(k2[j]) * angle);
  }
}

// bits (S, >= 2 ceil(P/2)) int32 holding the keystream's 32-bit words; out (S, P) contiguous;
// std one per row; rows: the rows to fill (the others are left as they are).
void gaussian_from_bits(const at::Tensor& bits, at::Tensor out, at::ArrayRef<double> std, at::IntArrayRef rows) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu(), "out must be (S, P), contiguous, on the CPU");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble, "out must be float32 or float64");
  const int64_t S = out.size(0), P = out.size(1), h = (P + 1) / 2;
  TORCH_CHECK(bits.dim() == 2 && bits.size(0) == S && bits.size(1) >= 2 * h && bits.stride(1) == 1 &&
                  bits.scalar_type() == at::kInt,
              "bits must be (S, >= 2 ceil(P/2)) int32 with contiguous rows");
  TORCH_CHECK(static_cast<int64_t>(std.size()) == S, "one standard deviation per row");
  for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < S, "row ", r, " out of range");
  const auto* k = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  for (int64_t r : rows) {
    if (out.scalar_type() == at::kFloat) {
      transform<float>(k + r * bits.stride(0), out.data_ptr<float>() + r * P, P, static_cast<float>(std[r]));
    } else {
      transform<double>(k + r * bits.stride(0), out.data_ptr<double>() + r * P, P, std[r]);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fedcore_native, m) {
  m.def("gaussian_from_bits(Tensor bits, Tensor(a!) out, float[] std, int[] rows) -> ()");
}

TORCH_LIBRARY_IMPL(fedcore_native, CPU, m) { m.impl("gaussian_from_bits", gaussian_from_bits); }
