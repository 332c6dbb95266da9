#pragma once

// Moving a block of `lanes` short rows into the lane-major layout of distill_block (element c of the row
// in lane l at out[c * lanes + l]) and back.
//
// Whole tiles of lanes x lanes values are copied row by row into a local array and written out transposed
// with constant loop bounds, which compilers turn into vector permutes (g++ and clang: about one
// instruction per value). Element by element, as the last partial tile still is, the transposition
// measured the most expensive part of a block of 100-class rows.

#include <cstddef>
#include <cstring>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// out[c * lanes + l] = rows[l][c] for c < n.
template <class T>
void rows_to_lanes(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
    std::size_t first = 0;
    for (; first + lanes <= n; first += lanes) {
        T tile[lanes][lanes];
        for (std::size_t lane = 0; lane < lanes; ++lane) std::memcpy(tile[lane], rows[lane] + first, sizeof tile[lane]);
        T* block = out + first * lanes;
        for (std::size_t c = 0; c < lanes; ++c)
            for (std::size_t lane = 0; lane < lanes; ++lane) block[c * lanes + lane] = tile[lane][c];
    }
    for (std::size_t c = first; c < n; ++c)
        for (std::size_t lane = 0; lane < lanes; ++lane) out[c * lanes + lane] = rows[lane][c];
}

// rows[l][c] = in[c * lanes + l] for c < n and the first `count` lanes.
template <class T>
void lanes_to_rows(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
    std::size_t first = 0;
    for (; first + lanes <= n; first += lanes) {
        T tile[lanes][lanes];
        const T* block = in + first * lanes;
        for (std::size_t c = 0; c < lanes; ++c)
            for (std::size_t lane = 0; lane < lanes; ++lane) tile[lane][c] = block[c * lanes + lane];
        for (std::size_t lane = 0; lane < count; ++lane) std::memcpy(rows[lane] + first, tile[lane], sizeof tile[lane]);
    }
    for (std::size_t lane = 0; lane < count; ++lane)
        for (std::size_t c = first; c < n; ++c) rows[lane][c] = in[c * lanes + lane];
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
