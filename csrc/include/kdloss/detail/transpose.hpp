#pragma once

// Moving a block of `lanes` short rows into the lane-major layout of distill_block (element c of the row
// in lane l at out[c * lanes + l]) and back. Element by element, this measured the most expensive part of
// a block of 100-class rows, so whole tiles are transposed at once, in one of two ways:
//   - by tiles: tiles of lanes x lanes values go through a local array with constant loop bounds, which
//     compilers that vectorise at all turn into permutes;
//   - by shuffles (g++ >= 12, clang): tiles of V x V values, V the values in one register, are loaded as
//     V vectors and transposed by log2(V) rounds of interleaves, V shuffles each.
// Columns past the last whole tile are moved element by element.

#include <cstddef>
#include <cstring>
#include <utility>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"

#ifndef KDLOSS_VECTOR_SHUFFLES
#if KDLOSS_VECTOR_EXTENSIONS && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define KDLOSS_VECTOR_SHUFFLES 1
#endif
#endif
#endif
#ifndef KDLOSS_VECTOR_SHUFFLES
#define KDLOSS_VECTOR_SHUFFLES 0
#endif

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// out[c * lanes + l] = rows[l][c] for c < n.
template <class T>
void rows_to_lanes_by_tiles(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
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
void lanes_to_rows_by_tiles(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
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

#if KDLOSS_VECTOR_SHUFFLES
// The values of one register, and their number.
template <class T>
using Vector = typename PartOf<T>::type;
template <class T>
inline constexpr std::size_t tile_width = lanes_per_part<T>;

// The first (High = false) or second half of a and b, interleaved: a0 b0 a1 b1 ...
template <bool High, class V, std::size_t Width, std::size_t... I>
KDLOSS_INLINE V interleave(V a, V b, std::index_sequence<I...>) noexcept {
    return __builtin_shufflevector(a, b, ((I % 2 ? Width : 0) + (High ? Width / 2 : 0) + I / 2)...);
}

// Transposes the tile whose rows are v[0 .. tile): after log2(tile) rounds of pairing row i with row
// i + tile/2, row j holds what was column j.
template <class T>
KDLOSS_INLINE void transpose_tile(Vector<T> (&v)[tile_width<T>]) noexcept {
    constexpr std::size_t n = tile_width<T>;
    using Indices = std::make_index_sequence<n>;
    for (std::size_t width = 1; width < n; width *= 2) {
        Vector<T> next[n];
        for (std::size_t i = 0; i < n / 2; ++i) {
            next[2 * i] = interleave<false, Vector<T>, n>(v[i], v[i + n / 2], Indices{});
            next[2 * i + 1] = interleave<true, Vector<T>, n>(v[i], v[i + n / 2], Indices{});
        }
        for (std::size_t i = 0; i < n; ++i) v[i] = next[i];
    }
}

// out[c * lanes + l] = rows[l][c] for c < n.
template <class T>
void rows_to_lanes_by_shuffles(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    std::size_t first = 0;
    for (; first + n_tile <= n; first += n_tile) {
        for (std::size_t group = 0; group < lanes; group += n_tile) {
            Vector<T> v[n_tile];
            for (std::size_t i = 0; i < n_tile; ++i) std::memcpy(&v[i], rows[group + i] + first, sizeof v[i]);
            transpose_tile<T>(v);
            for (std::size_t c = 0; c < n_tile; ++c) std::memcpy(out + (first + c) * lanes + group, &v[c], sizeof v[c]);
        }
    }
    for (std::size_t c = first; c < n; ++c)
        for (std::size_t lane = 0; lane < lanes; ++lane) out[c * lanes + lane] = rows[lane][c];
}

// rows[l][c] = in[c * lanes + l] for c < n and the first `count` lanes.
template <class T>
void lanes_to_rows_by_shuffles(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    std::size_t first = 0;
    for (; first + n_tile <= n; first += n_tile) {
        for (std::size_t group = 0; group < count; group += n_tile) {
            Vector<T> v[n_tile];
            for (std::size_t c = 0; c < n_tile; ++c) std::memcpy(&v[c], in + (first + c) * lanes + group, sizeof v[c]);
            transpose_tile<T>(v);
            const std::size_t rows_here = count - group < n_tile ? count - group : n_tile;
            for (std::size_t i = 0; i < rows_here; ++i) std::memcpy(rows[group + i] + first, &v[i], sizeof v[i]);
        }
    }
    for (std::size_t lane = 0; lane < count; ++lane)
        for (std::size_t c = first; c < n; ++c) rows[lane][c] = in[c * lanes + lane];
}

#endif

// Shuffles measured faster with AVX-512 (two-register permutes) and SSE2, slower with AVX2, whose
// interleaves stay within 16-byte halves; g++ then needs several instructions per shuffle.
inline constexpr bool transpose_by_shuffles = KDLOSS_VECTOR_SHUFFLES && vector_bytes != 32;

// out[c * lanes + l] = rows[l][c] for c < n.
template <class T>
void rows_to_lanes(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    if constexpr (transpose_by_shuffles) return rows_to_lanes_by_shuffles(rows, n, out);
#endif
    rows_to_lanes_by_tiles(rows, n, out);
}

// rows[l][c] = in[c * lanes + l] for c < n and the first `count` lanes.
template <class T>
void lanes_to_rows(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    if constexpr (transpose_by_shuffles) return lanes_to_rows_by_shuffles(in, n, rows, count);
#endif
    lanes_to_rows_by_tiles(in, n, rows, count);
}


}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
