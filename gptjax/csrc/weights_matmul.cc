// y = x @ dequantize(w) for small batches, reading the weights as stored (bfloat16, or int8 with one
// float32 scale per output column): the XLA FFI targets behind gptjax.cpu_kernels.
//
// Why this exists: XLA:CPU has no dot that reads bfloat16 or int8 weights next to float32 activations;
// it converts the whole kernel to a float32 buffer first, so decoding from smaller weights reads more
// memory than float32 does (benchmarks/NOTES.md). A decode step at batch 1 is a chain of
// matrix-vector products bound by the bytes of weight they read, so reading 2 or 1 bytes per weight
// instead of 4 is the whole speed-up. bfloat16 weights are widened to float32 in registers; activations,
// products and sums stay float32. int8 weights meet int8 activations (int8_rows.h): past one row the
// arithmetic, not the memory, bounds the call, and int8 products are four times as many per instruction.
// The order of the sums is fixed by the shapes alone, so results do not depend on which thread computed
// what.

#include <cstring>
#include <vector>

#include "int8_rows.h"
#include "tasks.h"

namespace ffi = xla::ffi;

namespace {

inline float widen(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(float w) { return w; }

// A task's share: y[r, j0:j1] = sum over i in [i0, i1) of x[r, i] * w[i, j], for r < m, written over
// y (row stride n). The portable loop goes one weight row at a time.
template <typename W>
void block_portable(const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n, int64_t i0,
                    int64_t i1, int64_t j0, int64_t j1) {
  for (int64_t r = 0; r < m; ++r) std::fill(y + r * n + j0, y + r * n + j1, 0.0f);
  for (int64_t i = i0; i < i1; ++i) {
    const W* row = w + i * n;
    for (int64_t r = 0; r < m; ++r) {
      const float xi = x[r * k + i];
      float* a = y + r * n;
      for (int64_t j = j0; j < j1; ++j) a[j] += xi * widen(row[j]);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define GPTJAX_SIMD 1

// The AVX-512 and the AVX2 loops: one body (weights_matmul_simd.inc) compiled for each instruction set, with
// the few operations it needs on a register of float32 lanes, spelled once here for a register of W bits
// (HALF: the integer register of half that width, loaded by HALF_LOAD). load() widens stored weights
// (bfloat16: the top half of a float32) or loads float32.
#define GPTJAX_VEC_OPS(W, LANES, HALF, HALF_LOAD)                                                        \
  using Vec = __m##W;                                                                                     \
  constexpr int64_t kLanes = LANES;                                                                       \
  inline Vec load(const float* p) { return _mm##W##_loadu_ps(p); }                                        \
  inline Vec load(const uint16_t* p) {                                                                    \
    __m##W##i u = _mm##W##_cvtepu16_epi32(HALF_LOAD(reinterpret_cast<const HALF*>(p)));                  \
    return _mm##W##_castsi##W##_ps(_mm##W##_slli_epi32(u, 16));                                           \
  }                                                                                                       \
  inline Vec broadcast(float v) { return _mm##W##_set1_ps(v); }                                           \
  inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm##W##_fmadd_ps(a, b, c); }                            \
  inline void store(float* p, Vec v) { _mm##W##_storeu_ps(p, v); }

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
namespace avx512 {
GPTJAX_VEC_OPS(512, 16, __m256i, _mm256_loadu_si256)
#include "weights_matmul_simd.inc"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
GPTJAX_VEC_OPS(256, 8, __m128i, _mm_loadu_si128)
#include "weights_matmul_simd.inc"
}  // namespace avx2
#pragma GCC pop_options

// The int8 loop with AVX-512 VNNI: a tile of 64 columns, a block of 32 rows of weights at a time. Each group
// of 4 weight rows is interleaved so that a 32-bit lane holds one column's 4 bytes (lane 4L + t of register
// s is column 16L + 4s + t), the order vpdpbusd multiplies 4 activation bytes by; the float sums stay in
// that order until the tile is done. vpdpbusd takes unsigned activations (q + 128), so each block's sums
// start from -128 times its column sums (also one vpdpbusd per register).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,fma")
namespace vnni {
constexpr int64_t kTile = 64;

inline void interleave(const int8_t* w, int64_t n, __m512i out[4]) {
  const __m512i r0 = _mm512_loadu_si512(w), r1 = _mm512_loadu_si512(w + n);
  const __m512i r2 = _mm512_loadu_si512(w + 2 * n), r3 = _mm512_loadu_si512(w + 3 * n);
  const __m512i a = _mm512_unpacklo_epi8(r0, r1), b = _mm512_unpackhi_epi8(r0, r1);
  const __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
  out[0] = _mm512_unpacklo_epi16(a, c);
  out[1] = _mm512_unpackhi_epi16(a, c);
  out[2] = _mm512_unpacklo_epi16(b, d);
  out[3] = _mm512_unpackhi_epi16(b, d);
}

// The interleaved order back to columns: a 4 x 4 transpose of 128-bit lanes, stored to y[0:64].
inline void store_columns(float* y, const float* sums) {
  const __m512 f[4] = {_mm512_loadu_ps(sums), _mm512_loadu_ps(sums + 16), _mm512_loadu_ps(sums + 32),
                       _mm512_loadu_ps(sums + 48)};
  const __m512 t0 = _mm512_shuffle_f32x4(f[0], f[1], 0x44), t1 = _mm512_shuffle_f32x4(f[2], f[3], 0x44);
  const __m512 t2 = _mm512_shuffle_f32x4(f[0], f[1], 0xEE), t3 = _mm512_shuffle_f32x4(f[2], f[3], 0xEE);
  _mm512_storeu_ps(y, _mm512_shuffle_f32x4(t0, t1, 0x88));
  _mm512_storeu_ps(y + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));
  _mm512_storeu_ps(y + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));
  _mm512_storeu_ps(y + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));
}

// Columns [j0, j0 + tiles * kTile): blocks outside, tiles inside, so each weight row is read front to back in
// runs of `tiles` * 64 bytes while the float sums of those tiles (in the interleaved order) stay in cache.
void add_tiles(const gptjax::Int8Rows& x, int64_t r0, int64_t r1, const int8_t* w, float* y, int64_t n, int64_t b0,
               int64_t b1, int64_t j0, int64_t tiles, float* sums) {
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  std::fill(sums, sums + (r1 - r0) * tiles * kTile, 0.0f);
  __m512i packed[gptjax::kBlock / 4][4];
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int8_t* wt = w + b * gptjax::kBlock * n + j0 + t * kTile;
      __m512i start[4];
      for (int s = 0; s < 4; ++s) start[s] = _mm512_setzero_si512();
      for (int64_t g = 0; g < gptjax::kBlock / 4; ++g) {
        interleave(wt + 4 * g * n, n, packed[g]);
        for (int s = 0; s < 4; ++s) start[s] = _mm512_dpbusd_epi32(start[s], offset, packed[g][s]);
      }
      for (int s = 0; s < 4; ++s) start[s] = _mm512_sub_epi32(_mm512_setzero_si512(), start[s]);
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* q = x.block(r, b);
        __m512i dot[4] = {start[0], start[1], start[2], start[3]};
        for (int64_t g = 0; g < gptjax::kBlock / 4; ++g) {
          int32_t four;
          std::memcpy(&four, q + 4 * g, sizeof four);
          const __m512i xq = _mm512_set1_epi32(four);
          for (int s = 0; s < 4; ++s) dot[s] = _mm512_dpbusd_epi32(dot[s], xq, packed[g][s]);
        }
        const __m512 scale = _mm512_set1_ps(x.block_scale(r, b));
        float* sum = sums + ((r - r0) * tiles + t) * kTile;
        for (int s = 0; s < 4; ++s) {
          _mm512_storeu_ps(sum + 16 * s,
                           _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[s]), scale, _mm512_loadu_ps(sum + 16 * s)));
        }
      }
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t t = 0; t < tiles; ++t) store_columns(y + r * n + j0 + t * kTile, sums + ((r - r0) * tiles + t) * kTile);
  }
}

void add_int8_blocks(const gptjax::Int8Rows& x, const int8_t* w, float* y, int64_t n, int64_t b0, int64_t b1,
                     int64_t j0, int64_t j1) {
  const int64_t full = std::min(b1, x.k / gptjax::kBlock);  // blocks of 32 whole rows
  const int64_t tiles = full > b0 ? (j1 - j0) / kTile : 0;
  // As many tiles at once as keep every row's sums within 256 KiB (at most 16: runs of 1024 bytes a weight row),
  // so each block of weights is interleaved once for all rows.
  const int64_t chunk = std::clamp<int64_t>(262144 / (x.m * kTile * 4), 1, 16);
  std::vector<float> sums(static_cast<size_t>(x.m * std::min(tiles, chunk) * kTile));
  for (int64_t t = 0; t < tiles; t += chunk) {
    add_tiles(x, 0, x.m, w, y, n, b0, full, j0 + t * kTile, std::min(chunk, tiles - t), sums.data());
  }
  // The columns past the last whole tile, and the last block when k is not a multiple of 32.
  const int64_t jt = j0 + tiles * kTile;
  gptjax::add_int8_blocks(x, w, y, n, b0, full, jt, j1);
  gptjax::add_int8_blocks(x, w, y, n, std::max(b0, full), b1, j0, j1);
}
}  // namespace vnni
#pragma GCC pop_options

// The int8 loop for AVX2 (and AVX-512 without VNNI): the portable loop, vectorised by the compiler.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
void add_int8_blocks(const gptjax::Int8Rows& x, const int8_t* w, float* y, int64_t n, int64_t b0, int64_t b1,
                     int64_t j0, int64_t j1) {
  gptjax::add_int8_blocks(x, w, y, n, b0, b1, j0, j1);
}
}  // namespace avx2
#pragma GCC pop_options
#endif

// `isa` is a resolved gptjax::Isa (the tests run every loop the machine has).
template <typename W>
void block(const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n, int64_t i0, int64_t i1,
           int64_t j0, int64_t j1, gptjax::Isa isa) {
#ifdef GPTJAX_SIMD
  if (isa == gptjax::kAvx512) return avx512::block(x, w, y, m, k, n, i0, i1, j0, j1);
  if (isa == gptjax::kAvx2) return avx2::block(x, w, y, m, k, n, i0, i1, j0, j1);
#endif
  block_portable(x, w, y, m, k, n, i0, i1, j0, j1);
}

// The int8 task: y[r, j0:j1] (zeroed here) for the weight rows [i0, i1), which start on a block.
void block_int8(const gptjax::Int8Rows& x, const int8_t* w, float* y, int64_t n, int64_t i0, int64_t i1, int64_t j0,
                int64_t j1, gptjax::Isa isa) {
  for (int64_t r = 0; r < x.m; ++r) std::fill(y + r * n + j0, y + r * n + j1, 0.0f);
  const int64_t b0 = i0 / gptjax::kBlock, b1 = (i1 + gptjax::kBlock - 1) / gptjax::kBlock;
#ifdef GPTJAX_SIMD
  if (isa == gptjax::kAvx512 && gptjax::cpu_has_vnni()) return vnni::add_int8_blocks(x, w, y, n, b0, b1, j0, j1);
  if (isa == gptjax::kAvx512 || isa == gptjax::kAvx2) return avx2::add_int8_blocks(x, w, y, n, b0, b1, j0, j1);
#endif
  gptjax::add_int8_blocks(x, w, y, n, b0, b1, j0, j1);
}

// Each task reads one contiguous stretch of the weights, so the hardware prefetcher streams it:
// - wide kernels (out_head, 50257 columns) are split by columns, each task taking every row's segment
//   of its columns (tens of KiB contiguous per row);
// - narrow ones (768 or 3072 columns, rows of a few KiB) by rows, each task a block of whole rows
//   into a float32 partial sum of y, the partials added in task order afterwards. Split by columns,
//   their tasks read every row in short pieces: in a decode-shaped chain of calls (gpt2-small's 73
//   matmuls) on this project's 2-core AVX-512 machine, bfloat16 took 13.7 ms that way, 11.2 ms by rows.
// One task per thread: more, smaller tasks (four per thread) measured slower. `task(y, i0, i1, j0, j1)`
// writes a task's share; row shares start at multiples of `align` rows.
constexpr int64_t kWideRowBytes = 64 * 1024;

template <typename Task>
void matmul(ffi::ThreadPool& pool, Task task, const float* scale, float* y, int64_t m, int64_t k, int64_t n,
            int64_t weight_bytes, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (n * weight_bytes >= kWideRowBytes || k < 8 * threads) {
    const int64_t width = ((n + threads - 1) / threads + 63) / 64 * 64;
    gptjax::run_tasks(pool, threads, (n + width - 1) / width, [=](int64_t t) {
      const int64_t j0 = t * width, j1 = std::min(n, j0 + width);
      task(y, 0, k, j0, j1);
      if (scale != nullptr) {
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t j = j0; j < j1; ++j) y[r * n + j] *= scale[j];
        }
      }
    });
    return;
  }
  const int64_t rows = (k / threads + align - 1) / align * align;
  const int64_t count = (k + rows - 1) / rows;
  std::vector<float> partial(static_cast<size_t>(count * m * n));
  float* p = partial.data();
  gptjax::run_tasks(pool, threads, count, [=](int64_t t) {
    task(p + t * m * n, t * rows, std::min(k, (t + 1) * rows), 0, n);
  });
  for (int64_t r = 0; r < m; ++r) {
    float* out = y + r * n;
    std::copy(p + r * n, p + (r + 1) * n, out);
    for (int64_t t = 1; t < count; ++t) {
      const float* part = p + (t * m + r) * n;
      for (int64_t j = 0; j < n; ++j) out[j] += part[j];
    }
    if (scale != nullptr) {
      for (int64_t j = 0; j < n; ++j) out[j] *= scale[j];
    }
  }
}

// The float32 and bfloat16 products: eight weight rows widened at once.
template <typename W>
void float_matmul(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t m, int64_t k, int64_t n,
                  gptjax::Isa isa) {
  auto task = [=](float* out, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    block(x, w, out, m, k, n, i0, i1, j0, j1, isa);
  };
  matmul(pool, task, nullptr, y, m, k, n, sizeof(W), 8);
}

// The [m, k] x [k, n] product a call computes. x and y may have several leading dimensions (m is their
// product) and w and the scale leading ones of size 1: what jax.vmap's "expand_dims" passes when the
// activations are batched and the weights are not (gptjax.cpu_kernels.weights_matmul).
struct Shape {
  int64_t m = 0, k = 0, n = 0;
};

bool leading_ones(ffi::AnyBuffer::Dimensions d, size_t keep) {
  for (size_t i = 0; i + keep < d.size(); ++i) {
    if (d[i] != 1) return false;
  }
  return true;
}

ffi::Error check(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions w, ffi::AnyBuffer::Dimensions y,
                 int32_t isa, Shape* shape) {
  if (isa != gptjax::kAuto && gptjax::resolve(isa) != isa) {
    return ffi::Error::InvalidArgument("weights_matmul: this CPU cannot run the loop asked for");
  }
  if (x.size() < 2 || w.size() < 2 || y.size() != x.size() || !leading_ones(w, 2)) {
    return ffi::Error::InvalidArgument("weights_matmul: x must be [..., m, k], w [k, n] (leading 1s allowed)");
  }
  shape->k = w[w.size() - 2];
  shape->n = w[w.size() - 1];
  shape->m = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) {
    if (y[i] != x[i]) return ffi::Error::InvalidArgument("weights_matmul: y must be [..., m, n] for x [..., m, k]");
    shape->m *= x[i];
  }
  if (x[x.size() - 1] != shape->k || y[y.size() - 1] != shape->n) {
    return ffi::Error::InvalidArgument("weights_matmul: shapes must be x [..., m, k], w [k, n], y [..., m, n]");
  }
  return ffi::Error::Success();
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  Shape s;
  if (ffi::Error e = check(x.dimensions(), w.dimensions(), y->dimensions(), isa, &s); e.failure()) return e;
  float_matmul(pool, x.typed_data(), reinterpret_cast<const uint16_t*>(w.typed_data()), y->typed_data(), s.m, s.k,
               s.n, gptjax::resolve(isa));
  return ffi::Error::Success();
}

ffi::Error MatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  Shape s;
  if (ffi::Error e = check(x.dimensions(), w.dimensions(), y->dimensions(), isa, &s); e.failure()) return e;
  float_matmul(pool, x.typed_data(), w.typed_data(), y->typed_data(), s.m, s.k, s.n, gptjax::resolve(isa));
  return ffi::Error::Success();
}

ffi::Error MatmulInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  Shape s;
  if (ffi::Error e = check(x.dimensions(), w.dimensions(), y->dimensions(), isa, &s); e.failure()) return e;
  const auto sd = scale.dimensions();
  if (sd.size() < 1 || sd[sd.size() - 1] != s.n || !leading_ones(sd, 1)) {
    return ffi::Error::InvalidArgument("weights_matmul: scale must have one entry per column of w");
  }
  const gptjax::Int8Rows rows(x.typed_data(), s.m, s.k);
  const int8_t* weights = w.typed_data();
  const gptjax::Isa loop = gptjax::resolve(isa);
  auto task = [&rows, weights, n = s.n, loop](float* out, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    block_int8(rows, weights, out, n, i0, i1, j0, j1, loop);
  };
  matmul(pool, task, scale.typed_data(), y->typed_data(), s.m, s.k, s.n, 1, gptjax::kBlock);
  return ffi::Error::Success();
}

}  // namespace

GPTJAX_EXPORT XLA_FFI_Error* GptjaxMatmulBf16(XLA_FFI_CallFrame* call_frame);
GPTJAX_EXPORT XLA_FFI_Error* GptjaxMatmulInt8(XLA_FFI_CallFrame* call_frame);
GPTJAX_EXPORT XLA_FFI_Error* GptjaxMatmulF32(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatmulF32, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxMatmulInt8, MatmulInt8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));
