// run_phases (phases.h): one at::parallel_for whose threads claim the phases' chunks from
// shared counters and wait, between phases, for the claimed chunks to finish.
#include "phases.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RNNKERN_SPIN_PAUSE() _mm_pause()
#else
#define RNNKERN_SPIN_PAUSE() std::this_thread::yield()
#endif

namespace rnnkern::cpu {
namespace {

constexpr size_t kMaxPhases = 8;
constexpr int kSpinsBeforeYield = 4096;

int64_t chunks_of(const Phase& phase) { return phase.size <= 0 ? 0 : (phase.size + phase.chunk - 1) / phase.chunk; }

// Per phase: the next chunk to claim and the chunks finished, each on its own cache line.
struct alignas(64) Counter {
  std::atomic<int64_t> value{0};
};

void wait_until(const Counter& counter, int64_t target) {
  for (int spins = 0; counter.value.load(std::memory_order_acquire) < target; ++spins) {
    if (spins < kSpinsBeforeYield) {
      RNNKERN_SPIN_PAUSE();
    } else {
      std::this_thread::yield();  // the thread being waited for may have lost its core
    }
  }
}

}  // namespace

int64_t chunk_for(int64_t size, int64_t threads, int64_t per_thread, int64_t multiple, int64_t minimum) {
  const int64_t pieces = std::max<int64_t>(1, threads * per_thread);
  const int64_t length = (size + pieces - 1) / pieces;
  return std::max(minimum, (length + multiple - 1) / multiple * multiple);
}

void run_phases(c10::ArrayRef<Phase> phases) {
  TORCH_CHECK(phases.size() <= kMaxPhases, "run_phases: at most ", kMaxPhases, " phases, got ", phases.size());
  int64_t most_chunks = 0;
  for (const Phase& phase : phases) most_chunks = std::max(most_chunks, chunks_of(phase));
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), most_chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    for (const Phase& phase : phases) {
      if (phase.size > 0) phase.run(0, phase.size);
    }
    return;
  }
  Counter claimed[kMaxPhases], finished[kMaxPhases];
  std::exception_ptr failure;  // the first chunk's exception; its chunk still counts as finished
  std::mutex failure_lock;
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (size_t p = 0; p < phases.size(); ++p) {
      const Phase& phase = phases[p];
      if (p > 0) wait_until(finished[p - 1], chunks_of(phases[p - 1]));
      const int64_t chunks = chunks_of(phase);
      for (int64_t c = claimed[p].value.fetch_add(1, std::memory_order_relaxed); c < chunks;
           c = claimed[p].value.fetch_add(1, std::memory_order_relaxed)) {
        try {
          phase.run(c * phase.chunk, std::min(phase.size, (c + 1) * phase.chunk));
        } catch (...) {
          const std::lock_guard<std::mutex> guard(failure_lock);
          if (!failure) failure = std::current_exception();
        }
        finished[p].value.fetch_add(1, std::memory_order_release);
      }
    }
  });
  if (failure) std::rethrow_exception(failure);
}

}  // namespace rnnkern::cpu
