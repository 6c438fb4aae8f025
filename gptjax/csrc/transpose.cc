// The last two axes of a bfloat16 array swapped and written out: [..., m, k] -> [..., k, m].
//
// Why a kernel for a transpose: XLA:CPU multiplies bfloat16 operands as bfloat16 (twice float32's rate,
// AVX512-BF16 / AMX) only when the left operand is contracted over its last axis; any other bfloat16 dot is
// widened to float32 first. A weight gradient x^T g contracts both operands over their first axis, so one of
// them must be transposed in memory first, and XLA folds any transpose it can see into the dot's dimension
// numbers (and widens the dot again). Its result lies in memory as this call wrote it.
#include <cstdint>
#include <cstring>

#include "tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;  // 64 x 64 bfloat16 = 8 KB read and 8 KB written per tile: within L1

ffi::Error SwapLastAxes(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::ResultBuffer<ffi::BF16> out) {
  const auto dims = x.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("swap_last_axes: needs at least two axes");
  const int64_t m = dims[dims.size() - 2], k = dims[dims.size() - 1];
  const int64_t batch = m * k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / (m * k);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.untyped_data());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->untyped_data());
  const int64_t row_tiles = (m + kTile - 1) / kTile;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One task per (matrix, band of kTile source rows): each writes its own columns of the destination.
  gptjax::run_tasks(pool, threads, batch * row_tiles, [=](int64_t t) {
    const int64_t b = t / row_tiles, i0 = (t % row_tiles) * kTile, i1 = std::min(i0 + kTile, m);
    const uint16_t* s = src + b * m * k;
    uint16_t* d = dst + b * m * k;
    for (int64_t j0 = 0; j0 < k; j0 += kTile) {
      const int64_t j1 = std::min(j0 + kTile, k);
      for (int64_t j = j0; j < j1; ++j) {
        for (int64_t i = i0; i < i1; ++i) d[j * m + i] = s[i * k + j];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

GPTJAX_EXPORT XLA_FFI_Error* GptjaxSwapLastAxesBf16(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxSwapLastAxesBf16, SwapLastAxes,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // out
