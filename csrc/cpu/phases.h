// Phases of a small kernel in one parallel region. A one-token decode step is a few dependent
// passes (a projection, then the pointwise work that reads all of it, then the next
// projection) of a few microseconds each; one at::parallel_for per pass costs about a
// microsecond of thread wake-up and join each time. run_phases opens one region instead: the
// threads claim chunks of a phase from a shared counter, and a thread moves to the next phase
// once every chunk of this one is done. A thread only ever waits for chunks another thread has
// claimed and is running, so the phases complete however many threads join (one thread that
// arrives alone runs them all), and a thread that wakes late takes fewer chunks.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace rnnkern::cpu {

struct Phase {
  int64_t size;   // items [0, size), in chunks of `chunk` (the last one shorter)
  int64_t chunk;  // > 0
  c10::function_ref<void(int64_t, int64_t)> run;  // run(first, last) for a chunk [first, last)
};

// A chunk length for `size` items over `threads` threads: `per_thread` chunks each, rounded up
// to a multiple of `multiple`, at least `minimum`.
int64_t chunk_for(int64_t size, int64_t threads, int64_t per_thread, int64_t multiple, int64_t minimum);

// Runs the phases in order, each over all its chunks, on at::get_num_threads() threads at most.
void run_phases(c10::ArrayRef<Phase> phases);

}  // namespace rnnkern::cpu
