// The Box-Muller transform of fedcore.noise.GaussianNoise in one pass per row: from a row's
// AES-CTR keystream (2 ceil(P/2) 32-bit words) to its P Gaussian values, with the same
// formulas and precision as the numpy ufuncs there. The log comes from glibc's vector math
// library (libmvec, up to 4 ulp; numpy's is of the same accuracy). The sine and cosine of the
// angle 2 pi k / 2^32 are computed here, both from one exact reduction (turn_sincos below):
// libmvec's separate sinf and cosf were 60 % of the transform's time. Values differ from the
// numpy path only in their last bits. Where the build finds OpenSSL's libcrypto
// (FEDCORE_OPENSSL defined), the streams themselves are here too (NoiseStream, native.h): the
// native step draws each copy's noise right before its step, in the core's cache.
// fedcore.engine.native builds it beside mlp_step.cpp (with -lmvec, and -lcrypto).

#include <ATen/ATen.h>
#include <torch/library.h>

#include "native.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#ifdef FEDCORE_OPENSSL
#include <openssl/crypto.h>
#include <openssl/evp.h>
#endif

// glibc declares these SIMD variants only under -ffast-math, which this build does not use.
extern "C" {
#pragma omp declare simd notinbranch
float logf(float);
#pragma omp declare simd notinbranch
double log(double);
}

namespace {

// Taylor coefficients of sin x / x and cos x in z = x^2, to below half an ulp on [-pi/4, pi/4]
// (float: sin to x^9, cos to x^10, next terms 2.5e-9 and 1.2e-10 of the value; double: sin to
// x^17, cos to x^16, next terms below 1e-19 and 3e-18).
template <typename T>
struct TurnSeries;
template <>
struct TurnSeries<float> {
  static constexpr int kSin = 5, kCos = 6;
  static constexpr float sin[kSin] = {1.0f, -1.0f / 6, 1.0f / 120, -1.0f / 5040, 1.0f / 362880};
  static constexpr float cos[kCos] = {1.0f, -1.0f / 2, 1.0f / 24, -1.0f / 720, 1.0f / 40320, -1.0f / 3628800};
};
template <>
struct TurnSeries<double> {
  static constexpr int kSin = 9, kCos = 9;
  static constexpr double sin[kSin] = {1.0, -1.0 / 6, 1.0 / 120, -1.0 / 5040, 1.0 / 362880, -1.0 / 39916800,
                                       1.0 / 6227020800.0, -1.0 / 1307674368000.0, 1.0 / 355687428096000.0};
  static constexpr double cos[kCos] = {1.0, -1.0 / 2, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800,
                                       1.0 / 479001600.0, -1.0 / 87178291200.0, 1.0 / 20922789888000.0};
};

// sin and cos of the angle 2 pi k / 2^32. The nearest quarter turn q is split off exactly, in
// integers (k - q 2^30 is the rest, in [-2^29, 2^29)), so only x = rest * 2 pi / 2^32, within
// [-pi/4, pi/4], goes through the series; then (sin, cos) of the angle is (s, c), (c, -s),
// (-s, -c) or (-c, s) for q = 0..3. Plain multiplies and adds in Horner's order: the same
// bits in every instruction set's clone (no fused multiply-adds, -ffp-contract=off).
template <typename T>
inline void turn_sincos(uint32_t k, T& sin_out, T& cos_out) {
  using Series = TurnSeries<T>;
  const uint32_t q = (k + (1u << 29)) >> 30;  // wraps to 0 near a full turn, as the angle does
  const int32_t rest = static_cast<int32_t>(k - (q << 30));
  const T x = static_cast<T>(rest) * static_cast<T>(2.0 * M_PI / 4294967296.0);
  const T z = x * x;
  T s = Series::sin[Series::kSin - 1];
  for (int i = Series::kSin - 2; i >= 0; --i) s = s * z + Series::sin[i];
  s = s * x;
  T c = Series::cos[Series::kCos - 1];
  for (int i = Series::kCos - 2; i >= 0; --i) c = c * z + Series::cos[i];
  const T sine = (q & 1u) ? c : s, cosine = (q & 1u) ? s : c;
  sin_out = (q & 2u) ? -sine : sine;
  cos_out = ((q + 1u) & 2u) ? -cosine : cosine;
}

inline float vlog(float x) { return logf(x); }
inline double vlog(double x) { return log(x); }

// Row r of out (P values) from its keystream k (k1 = k[0, h), k2 = k[h, 2h)), std s:
// radius sqrt(-2 s^2 ln((k1 + 1) / 2^32)), angle 2 pi k2 / 2^32; cosines first, then sines
// (the last sine dropped when P is odd).
template <typename T>
FEDCORE_CLONES void transform(const uint32_t* k, T* out, int64_t P, T s) {
  const int64_t h = (P + 1) / 2, rest = P - h;
  const T scale = static_cast<T>(1.0 / 4294967296.0);
  const T c = static_cast<T>(-2.0) * s * s;
  const uint32_t* k2 = k + h;
#pragma omp simd
  for (int64_t j = 0; j < rest; ++j) {
    const T radius = std::sqrt(vlog((static_cast<T>(k[j]) + T(1)) * scale) * c);
    T sine, cosine;
    turn_sincos(k2[j], sine, cosine);
    out[h + j] = sine * radius;
    out[j] = radius * cosine;
  }
  for (int64_t j = rest; j < h; ++j) {  // the unpaired last cosine (P odd)
    const T radius = std::sqrt(vlog((static_cast<T>(k[j]) + T(1)) * scale) * c);
    T sine, cosine;
    turn_sincos(k2[j], sine, cosine);
    out[j] = radius * cosine;
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

// Which library's AES the native step's noise streams use ("OpenSSL 3.0.19 ..."), or "" where
// the build has none (the caller then draws the noise).
std::string noise_library() {
#ifdef FEDCORE_OPENSSL
  return OpenSSL_version(OPENSSL_VERSION);
#else
  return "";
#endif
}

}  // namespace

namespace fedcore {

void gaussian_row(const uint32_t* k, float* out, int64_t P, float s) { transform<float>(k, out, P, s); }
void gaussian_row(const uint32_t* k, double* out, int64_t P, double s) { transform<double>(k, out, P, s); }

#ifdef FEDCORE_OPENSSL
NoiseStream::NoiseStream(const uint8_t* key, int64_t* at) : ctx_(nullptr), at_(at) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  if (ctx == nullptr) return;
  // The counter block of byte *at: its 16-byte block number, big-endian (the counter
  // cryptography's CTR mode starts from zero and increments as one 128-bit number).
  const uint64_t block = static_cast<uint64_t>(*at) / 16;
  unsigned char iv[16] = {0};
  for (int i = 0; i < 8; ++i) iv[15 - i] = static_cast<unsigned char>(block >> (8 * i));
  const int skip = static_cast<int>(*at % 16);
  unsigned char zeros[16] = {0}, discard[16];
  int written = 0;
  if (EVP_EncryptInit_ex(ctx, EVP_aes_128_ctr(), nullptr, key, iv) != 1 ||
      (skip > 0 && EVP_EncryptUpdate(ctx, discard, &written, zeros, skip) != 1)) {
    EVP_CIPHER_CTX_free(ctx);
    return;
  }
  ctx_ = ctx;
}

NoiseStream::~NoiseStream() { EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(ctx_)); }

// The stream's next `words` 32-bit words (AES-CTR over zeros: the keystream itself), in a
// buffer of the calling thread that the next call overwrites.
const uint32_t* NoiseStream::next(int64_t words) {
  thread_local std::vector<uint32_t> bits;
  bits.resize(words);
  std::memset(bits.data(), 0, words * sizeof(uint32_t));
  auto* bytes = reinterpret_cast<unsigned char*>(bits.data());
  int written = 0;
  // In place; CTR cannot fail once initialized (lengths were checked to fit an int).
  EVP_EncryptUpdate(static_cast<EVP_CIPHER_CTX*>(ctx_), bytes, &written, bytes, static_cast<int>(words * sizeof(uint32_t)));
  *at_ += words * static_cast<int64_t>(sizeof(uint32_t));
  return bits.data();
}

void NoiseStream::draw(float* out, int64_t P, float s) { transform<float>(next(2 * ((P + 1) / 2)), out, P, s); }
void NoiseStream::draw(double* out, int64_t P, double s) { transform<double>(next(2 * ((P + 1) / 2)), out, P, s); }
#endif

}  // namespace fedcore

TORCH_LIBRARY_FRAGMENT(fedcore_native, m) {
  m.def("gaussian_from_bits(Tensor bits, Tensor(a!) out, float[] std, int[] rows) -> ()");
  m.def("noise_library() -> str", noise_library);
}

TORCH_LIBRARY_IMPL(fedcore_native, CPU, m) { m.impl("gaussian_from_bits", gaussian_from_bits); }
