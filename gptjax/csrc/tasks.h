// What gptjax's two CPU kernels share: splitting a call into tasks run on XLA's intra-op thread pool, and
// which SIMD loop a call takes.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace gptjax {

// The loops a call can take: the attribute `isa` of both FFI targets (gptjax.cpu_kernels.ISAS). kAuto is
// the widest this CPU runs; the others force one (the tests compare them on one machine).
enum Isa : int32_t { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kPortable = 3 };

inline bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == kAvx512) return __builtin_cpu_supports("avx512f");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kPortable;
}

// AVX-512's int8 dot products (vpdpbusd), which the AVX-512 int8 loop uses where the CPU has them.
inline bool cpu_has_vnni() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

// The loop a call takes for the attribute it was given; kAuto where the CPU lacks the one asked for
// (the caller reports that as an error).
inline Isa resolve(int32_t requested) {
  if (requested != kAuto) return cpu_has(static_cast<Isa>(requested)) ? static_cast<Isa>(requested) : kAuto;
  if (cpu_has(kAvx512)) return kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kPortable;
}

// Tasks are handed out through an atomic counter to the calling thread and to helpers queued on XLA's
// intra-op pool. The caller works too and waits only for tasks already taken, so the call finishes even
// when no pool thread is free (XLA may run several custom calls at once on its pool), and a helper that
// wakes late still takes what is left.
struct Tasks {
  explicit Tasks(int64_t count) : count(count) {}
  const int64_t count;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename Fn>
void run_tasks(xla::ffi::ThreadPool& pool, int64_t threads, int64_t count, Fn fn) {
  auto tasks = std::make_shared<Tasks>(count);
  auto work = [tasks, fn]() {
    for (int64_t t; (t = tasks->next.fetch_add(1)) < tasks->count;) {
      fn(t);
      tasks->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, count); ++t) pool.Schedule(std::function<void()>(work));
  work();
  while (tasks->done.load(std::memory_order_acquire) < count) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace gptjax

// The library is built with hidden visibility; only the FFI handlers and gptjax_supported_isas are its
// interface.
#define GPTJAX_EXPORT extern "C" __attribute__((visibility("default")))
