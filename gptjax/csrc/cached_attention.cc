// One decode step's attention over a KV cache that the call extends in place: the XLA FFI target behind
// gptjax.cpu_kernels.cached_attention.
//
// Why this exists: in XLA, a decode step writes the new key and value into the cache (a
// dynamic-update-slice of the decode loop's carry) and the same iteration reads the cache for attention.
// XLA:CPU's copy insertion then copies every layer's K and V slabs several times a token (48 copies of
// 786 KB a token at gpt2-small's 256-slot bucket: ~4 ms of a 14 ms bfloat16 step, benchmarks/NOTES.md),
// and attention reads all the slots of the bucket, filled or not. Here the cache operands are aliased to
// the results: the call writes one slot per row and head and reads only slots 0..pos.
//
// Numerics follow gptjax.attention.causal_attention for one query: scores are float32 dot products divided
// by sqrt(head_dim), softmax as jax.nn.softmax computes it (exp(s - max) / sum), then the weighted sum
// of the values. Every loop variant sums in the same order (16 partial sums per dot product, added in
// lane order; the library is built without floating-point contraction), so they agree bit for bit.

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "tasks.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;

// A dot product as 16 partial sums over the lanes d % 16, added in lane order: one fixed order that
// compilers turn into vector code without reassociating anything.
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t n) {
  float partial[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += a[d + l] * b[d + l];
  }
  for (int64_t l = 0; d + l < n; ++l) partial[l] += a[d + l] * b[d + l];
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += partial[l];
  return sum;
}

// One row's one head: keys k[0..visible) and values v[0..visible), each [head_dim]; `scores` has room for
// `visible` floats.
__attribute__((always_inline)) inline void attend(const float* q, const float* k, const float* v, float* out,
                                                  float* scores, int64_t visible, int64_t head_dim) {
  if (visible == 0) {  // every key masked: softmax over nothing, as XLA computes it
    std::fill(out, out + head_dim, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float root = std::sqrt(static_cast<float>(head_dim));
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < visible; ++j) {
    scores[j] = dot(q, k + j * head_dim, head_dim) / root;
    top = std::max(top, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < visible; ++j) {
    scores[j] = std::exp(scores[j] - top);
    total += scores[j];
  }
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t j = 0; j < visible; ++j) {
    const float w = scores[j] / total;
    const float* vj = v + j * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) out[d] += w * vj[d];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void attend_avx512(const float* q, const float* k, const float* v, float* out,
                                                      float* scores, int64_t visible, int64_t head_dim) {
  attend(q, k, v, out, scores, visible, head_dim);
}
__attribute__((target("avx2,fma"))) void attend_avx2(const float* q, const float* k, const float* v, float* out,
                                                     float* scores, int64_t visible, int64_t head_dim) {
  attend(q, k, v, out, scores, visible, head_dim);
}
#endif
void attend_portable(const float* q, const float* k, const float* v, float* out, float* scores, int64_t visible,
                     int64_t head_dim) {
  attend(q, k, v, out, scores, visible, head_dim);
}

using AttendFn = void (*)(const float*, const float*, const float*, float*, float*, int64_t, int64_t);

AttendFn attend_for(gptjax::Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == gptjax::kAvx512) return attend_avx512;
  if (isa == gptjax::kAvx2) return attend_avx2;
#endif
  return attend_portable;
}

// q: [rows, heads, head_dim]; k, v: [rows, groups, head_dim]; the caches [cache_rows, groups, slots, head_dim];
// pos, cache_row: [rows]. groups divides heads: key/value head g serves query heads g * heads / groups and
// the next heads / groups - 1 (grouped-query attention; groups == heads is multi-head attention). Row r's
// keys and values go to slot pos[r] (clamped into the cache, as XLA's dynamic-update-slice clamps) of cache
// row cache_row[r], and its queries attend to that row's slots 0..pos[r].
ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cache_k, ffi::Buffer<ffi::F32> cache_v,
                           ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::S32> cache_row, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> new_k, ffi::ResultBuffer<ffi::F32> new_v, int32_t isa) {
  const auto dims = cache_k.dimensions();
  if (dims.size() < 3 || cache_v.dimensions().size() != dims.size()) {
    return ffi::Error::InvalidArgument("cached_attention: caches must be [..., groups, slots, head_dim]");
  }
  const int64_t head_dim = dims[dims.size() - 1], slots = dims[dims.size() - 2], groups = dims[dims.size() - 3];
  const int64_t rows = static_cast<int64_t>(pos.element_count());
  const int64_t cache_rows = cache_k.element_count() / std::max<int64_t>(1, groups * slots * head_dim);
  const int64_t heads = q.element_count() / std::max<int64_t>(1, rows * head_dim);
  if (cache_k.element_count() != cache_rows * groups * slots * head_dim || cache_row.element_count() != rows ||
      cache_v.element_count() != cache_k.element_count() || q.element_count() != rows * heads * head_dim ||
      groups == 0 || heads % groups != 0 || k.element_count() != rows * groups * head_dim ||
      v.element_count() != k.element_count() || out->element_count() != q.element_count() ||
      new_k->element_count() != cache_k.element_count() || new_v->element_count() != cache_v.element_count()) {
    return ffi::Error::InvalidArgument(
        "cached_attention: q must be [rows, heads, head_dim] and k, v [rows, groups, head_dim] for caches "
        "[cache_rows, groups, slots, head_dim], groups dividing heads, and pos, cache_row [rows]");
  }
  const int32_t* rd = cache_row.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    if (rd[r] < 0 || rd[r] >= cache_rows) {
      return ffi::Error::InvalidArgument("cached_attention: a cache_row lies outside the cache");
    }
  }
  const gptjax::Isa chosen = gptjax::resolve(isa);
  if (isa != gptjax::kAuto && chosen != isa) {
    return ffi::Error::InvalidArgument("cached_attention: this CPU cannot run the loop asked for");
  }
  const AttendFn attend_fn = attend_for(chosen);
  // XLA gives the aliased results the operands' buffers; copy only if it did not.
  float* ck = new_k->typed_data();
  float* cv = new_v->typed_data();
  if (ck != cache_k.typed_data()) std::memcpy(ck, cache_k.typed_data(), cache_k.size_bytes());
  if (cv != cache_v.typed_data()) std::memcpy(cv, cache_v.typed_data(), cache_v.size_bytes());
  const float *qd = q.typed_data(), *kd = k.typed_data(), *vd = v.typed_data();
  const int32_t* pd = pos.typed_data();
  float* od = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // One task per (row, key/value head); a task writes its slot before reading, so it reads nothing another
  // writes (rows that write share no cache row: the caller's contract), then attends for each query head the
  // key/value head serves. A row at a negative position writes nothing and reads nothing: the padding rows
  // of a serving batch, which may name any cache row.
  const int64_t per_group = heads / groups;
  gptjax::run_tasks(pool, threads, rows * groups, [=](int64_t t) {
    const int64_t r = t / groups, g = t % groups;
    const int64_t at = std::min<int64_t>(pd[r], slots - 1);
    const int64_t visible = pd[r] < 0 ? 0 : at + 1;
    float* kc = ck + (rd[r] * groups + g) * slots * head_dim;
    float* vc = cv + (rd[r] * groups + g) * slots * head_dim;
    if (pd[r] >= 0) {
      std::memcpy(kc + at * head_dim, kd + t * head_dim, head_dim * sizeof(float));
      std::memcpy(vc + at * head_dim, vd + t * head_dim, head_dim * sizeof(float));
    }
    std::vector<float> scores(static_cast<size_t>(std::max<int64_t>(visible, 1)));
    for (int64_t h = (r * heads + g * per_group) * head_dim, end = h + per_group * head_dim; h < end; h += head_dim) {
      attend_fn(qd + h, kc, vc, od + h, scores.data(), visible, head_dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

GPTJAX_EXPORT XLA_FFI_Error* GptjaxCachedAttention(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxCachedAttention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache_k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cache_v
                                  .Arg<ffi::Buffer<ffi::S32>>()  // pos
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cache_row
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cache_k, aliased
                                  .Ret<ffi::Buffer<ffi::F32>>()  // cache_v, aliased
                                  .Attr<int32_t>("isa"));

// Which of gptjax::Isa this CPU runs, as bits 1 << isa (for gptjax.cpu_kernels.supported_isas).
GPTJAX_EXPORT int32_t gptjax_supported_isas() {
  int32_t bits = 0;
  for (gptjax::Isa isa : {gptjax::kAvx512, gptjax::kAvx2, gptjax::kPortable}) {
    if (gptjax::cpu_has(isa)) bits |= 1 << isa;
  }
  return bits;
}
