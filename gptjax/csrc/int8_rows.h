// int8 weights times int8 activations for weights_matmul.cc: the activations quantized in blocks of kBlock
// along k, as llama.cpp's q8_0 does, each block's products summed exactly in int32 and only then scaled.
//
// Why: at a few rows a decode step from int8 weights stops being bound by the bytes it reads and becomes
// bound by arithmetic (gpt2-small's 73 decode matmuls, one after another: 4.7 ms at one row, 17.2 ms at eight
// when the weights were widened to float32 for float32 multiply-adds, at the 2-core AMD EPYC's AVX-512
// peak). AVX-512 VNNI's vpdpbusd does 64 int8 multiply-adds where vfmadd231ps does 16 float32 ones.
//
// The numbers, the same in every loop: row r's block b of x is scaled by s = max|x| / 127 and rounded to
// q = round-half-even(x * (127 / max|x|)) in [-127, 127] (float32 arithmetic; an all-zero block has s = 0, one holding
// a NaN or an infinity s = NaN); block b's dot product with column j, sum of q * w, is exact in int32;
// y[r, j] = sum over the blocks, in order, of fma(float(dot), s, y), then times the column's weight scale.
// Integer sums are exact whatever their order, and the float operations are the same in every loop, so the
// loops agree bit for bit.

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace gptjax {

constexpr int64_t kBlock = 32;

// x [m, k] quantized: values are q + 128 (VNNI multiplies unsigned bytes by signed ones), each row padded
// to whole blocks with 128 (q = 0).
struct Int8Rows {
  int64_t m = 0, k = 0, blocks = 0, width = 0;
  std::vector<uint8_t> values;  // [m, width]
  std::vector<float> scale;     // [m, blocks]

  Int8Rows(const float* x, int64_t m, int64_t k)
      : m(m), k(k), blocks((k + kBlock - 1) / kBlock), width(blocks * kBlock), values(m * width, 128),
        scale(m * blocks, 0.0f) {
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const float* xb = x + r * k + b * kBlock;
        const int64_t len = std::min(kBlock, k - b * kBlock);
        // Plain comparisons and the round-to-nearest-even of adding and subtracting 1.5 * 2^23 (exact for
        // |v| <= 127): loops the compiler vectorises, where std::nearbyint is a library call per value.
        float amax = 0.0f;
        bool finite = true;
        for (int64_t i = 0; i < len; ++i) {
          const float a = std::fabs(xb[i]);
          amax = a > amax ? a : amax;
          finite = finite & (a <= std::numeric_limits<float>::max());
        }
        if (!finite) {
          scale[r * blocks + b] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        if (amax == 0.0f) continue;
        const float inv = 127.0f / amax;
        constexpr float kRound = 12582912.0f;
        uint8_t* q = values.data() + r * width + b * kBlock;
        for (int64_t i = 0; i < len; ++i) {
          const float v = (xb[i] * inv + kRound) - kRound;
          q[i] = static_cast<uint8_t>(static_cast<int32_t>(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v) + 128);
        }
        scale[r * blocks + b] = amax / 127.0f;
      }
    }
  }

  const uint8_t* block(int64_t r, int64_t b) const { return values.data() + r * width + b * kBlock; }
  float block_scale(int64_t r, int64_t b) const { return scale[r * blocks + b]; }
};

}  // namespace gptjax

namespace gptjax {

// y[r, j0:j1] += the products of x's blocks [b0, b1) with w's columns [j0, j1) (row stride n), block by
// block in order: the loop every instruction set compiles (inlined into each, so vectorised for it).
__attribute__((always_inline)) inline void add_int8_blocks(const Int8Rows& x, const int8_t* w, float* y, int64_t n,
                                                           int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
  std::vector<int32_t> dot(static_cast<size_t>(j1 - j0));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * kBlock, i1 = std::min(x.k, i0 + kBlock);
    for (int64_t r = 0; r < x.m; ++r) {
      std::fill(dot.begin(), dot.end(), 0);
      const uint8_t* q = x.block(r, b);
      for (int64_t i = i0; i < i1; ++i) {
        const int32_t xi = static_cast<int32_t>(q[i - i0]) - 128;
        const int8_t* row = w + i * n + j0;
        for (int64_t j = 0; j < j1 - j0; ++j) dot[j] += xi * static_cast<int32_t>(row[j]);
      }
      const float s = x.block_scale(r, b);
      float* out = y + r * n + j0;
      for (int64_t j = 0; j < j1 - j0; ++j) out[j] = std::fma(static_cast<float>(dot[j]), s, out[j]);
    }
  }
}

}  // namespace gptjax
