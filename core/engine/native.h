// What fedcore's native sources (mlp_step.cpp, gaussian.cpp) share.
#pragma once

#include <cstdint>

// A loop-heavy function compiled for a few instruction sets and picked at load time, so the
// build flags stay portable. Nothing may throw inside one: its clones cannot pass an
// exception on (arguments are checked before the call).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDCORE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDCORE_CLONES
#endif

namespace fedcore {

// The Box-Muller transform of fedcore.noise.GaussianNoise (gaussian.cpp): a row's P values at
// standard deviation s from its keystream k (2 ceil(P/2) 32-bit words).
void gaussian_row(const uint32_t* k, float* out, int64_t P, float s);
void gaussian_row(const uint32_t* k, double* out, int64_t P, double s);

#ifdef FEDCORE_OPENSSL
// One stream of fedcore.noise.GaussianNoise drawn in native code (gaussian.cpp): OpenSSL's
// AES-128-CTR under the stream's key over a zero counter, from the byte *at on; each draw of P
// values takes 8 ceil(P/2) bytes of it and advances *at by as many. Draws the same values as
// the Python stream at the same position (the same keystream, the same transform).
class NoiseStream {
 public:
  // key: 16 bytes; at: the bytes of the stream drawn so far (read now, advanced by each draw).
  NoiseStream(const uint8_t* key, int64_t* at);
  ~NoiseStream();
  NoiseStream(const NoiseStream&) = delete;
  NoiseStream& operator=(const NoiseStream&) = delete;
  // Whether OpenSSL took the key (else draw must not be called).
  bool ok() const { return ctx_ != nullptr; }
  // The stream's next P values at standard deviation s into out.
  void draw(float* out, int64_t P, float s);
  void draw(double* out, int64_t P, double s);

 private:
  const uint32_t* next(int64_t words);
  void* ctx_;
  int64_t* at_;
};
#endif

}  // namespace fedcore
