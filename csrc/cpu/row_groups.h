// Work splits. The LSTM and GRU kernels': the batch rows divide into one group per thread, and
// each group runs the whole time loop on its own rows (its GEMMs included), so threads never
// wait for each other. The scans' backward: tasks own pairs (a sequence and a group of
// channels or heads that share a gradient of B and C) or blocks of a pair's members.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace rnnkern::cpu {

struct RowGroups {
  int64_t rows;
  int64_t count;

  static RowGroups of(int64_t rows) {
    return {rows, std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads()))};
  }
  int64_t begin(int64_t group) const { return rows * group / count; }
};

// Runs fn(first_row, end_row) for every group, the groups in parallel.
template <typename Fn>
void for_each_row_group(int64_t rows, const Fn& fn) {
  const RowGroups groups = RowGroups::of(rows);
  at::parallel_for(0, groups.count, 1, [&](int64_t first, int64_t last) {
    for (int64_t group = first; group < last; ++group) fn(groups.begin(group), groups.begin(group + 1));
  });
}

// Blocks to split each of `pairs` pairs into, from 1 to `members`: a pair is split only when
// there are too few pairs for about two tasks per thread, as each block of a pair writes the
// pair's shared gradients into a slot of its own, summed afterwards.
inline int64_t blocks_per_pair(int64_t pairs, int64_t members) {
  const int64_t wanted = 2 * at::get_num_threads();
  return std::clamp<int64_t>((wanted + pairs - 1) / std::max<int64_t>(pairs, 1), 1, std::max<int64_t>(members, 1));
}

}  // namespace rnnkern::cpu
