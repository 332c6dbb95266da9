#pragma once

// Moving a block of `lanes` short rows into the lane-major layout of distill_block (element c of the row
// in lane l at out[c * lanes + l]) and back. Element by element, this measured the most expensive part of
// a block of 100-class rows, so whole tiles are transposed at once, in one of two ways:
//   - by tiles: tiles of lanes x lanes values go through a local array with constant loop bounds, which
//     compilers that vectorise at all turn into permutes;
//   - by shuffles (g++ >= 12, clang): tiles of V x V values, V the values in one register, are loaded as
//     V vectors and transposed by rounds of shuffles that each map onto one instruction of the target.
// Columns past the last whole tile are moved element by element.

#include <cstddef>
#include <cstring>
#include <limits>
#include <utility>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/pack.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// Columns [first, n) one value at a time: what whole tiles leave over.
template <class T>
void rows_to_lanes_one_by_one(const T* const (&rows)[lanes], std::size_t first, std::size_t n, T* out) noexcept {
    for (std::size_t c = first; c < n; ++c)
        for (std::size_t lane = 0; lane < lanes; ++lane) out[c * lanes + lane] = rows[lane][c];
}
template <class T>
void lanes_to_rows_one_by_one(const T* in, std::size_t first, std::size_t n, T* const (&rows)[lanes],
                              std::size_t count) noexcept {
    for (std::size_t lane = 0; lane < count; ++lane)
        for (std::size_t c = first; c < n; ++c) rows[lane][c] = in[c * lanes + lane];
}

// out[c * lanes + l] = rows[l][c] for c < n; returns each row's maximum.
template <class T>
Pack<T> rows_to_lanes_by_tiles(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
    std::size_t first = 0;
    for (; first + lanes <= n; first += lanes) {
        T tile[lanes][lanes];
        for (std::size_t lane = 0; lane < lanes; ++lane) std::memcpy(tile[lane], rows[lane] + first, sizeof tile[lane]);
        T* block = out + first * lanes;
        for (std::size_t c = 0; c < lanes; ++c)
            for (std::size_t lane = 0; lane < lanes; ++lane) block[c * lanes + lane] = tile[lane][c];
    }
    rows_to_lanes_one_by_one(rows, first, n, out);
    return lane_maxima<T, false>(out, nullptr, n * lanes).student;
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
    lanes_to_rows_one_by_one(in, first, n, rows, count);
}

#if KDLOSS_VECTOR_SHUFFLES
// The values of one register, and their number.
template <class T>
using Vector = typename PartOf<T>::type;
template <class T>
inline constexpr std::size_t tile_width = lanes_per_part<T>;

// Unaligned vector loads and stores (a memcpy of a vector goes through the stack in 16-byte pieces with
// g++ -mavx2).
template <class T>
KDLOSS_INLINE Vector<T> load_vector(const T* p) noexcept {
    return *reinterpret_cast<const typename PartOf<T>::unaligned*>(p);
}
template <class T>
KDLOSS_INLINE void store_vector(T* p, const Vector<T>& v) noexcept {
    *reinterpret_cast<typename PartOf<T>::unaligned*>(p) = v;
}

// The first (High = false) or second half of a and b, interleaved: a0 b0 a1 b1 ...
template <bool High, class V, std::size_t Width, std::size_t... I>
KDLOSS_INLINE V interleave(V a, V b, std::index_sequence<I...>) noexcept {
    return __builtin_shufflevector(a, b, ((I % 2 ? Width : 0) + (High ? Width / 2 : 0) + I / 2)...);
}

// Transposes the tile whose rows are v[0 .. tile_width): row j then holds what was column j.
template <class T>
KDLOSS_INLINE void transpose_tile(Vector<T> (&v)[tile_width<T>]) noexcept {
    constexpr std::size_t n = tile_width<T>;
    using V = Vector<T>;
    if constexpr (vector_bytes == 32 && n == 8) {
        // AVX, 8 floats: shuffles stay within 16-byte halves except the last round's, as in its instructions
        // (unpcklps/unpckhps, shufps, vperm2f128).
        V t[8], u[8];
        KDLOSS_UNROLL
        for (std::size_t k = 0; k < 4; ++k) {
            t[2 * k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 8, 1, 9, 4, 12, 5, 13);
            t[2 * k + 1] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 2, 10, 3, 11, 6, 14, 7, 15);
        }
        KDLOSS_UNROLL
        for (std::size_t g = 0; g < 8; g += 4)
            KDLOSS_UNROLL
            for (std::size_t k = 0; k < 2; ++k) {
                u[g + 2 * k] = __builtin_shufflevector(t[g + k], t[g + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                u[g + 2 * k + 1] = __builtin_shufflevector(t[g + k], t[g + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
            }
        KDLOSS_UNROLL
        for (std::size_t j = 0; j < 4; ++j) {
            v[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
            v[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
        }
    } else if constexpr (vector_bytes == 32 && n == 4) {
        // AVX, 4 doubles: unpcklpd/unpckhpd, then vperm2f128.
        const V t0 = __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6);
        const V t1 = __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
        const V t2 = __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6);
        const V t3 = __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
        v[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
        v[1] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
        v[2] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
        v[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
    } else {
        // log2(n) rounds of pairing row i with row i + n/2 by interleaves: single instructions with
        // AVX-512 (vpermt2ps/pd) and with SSE2 or NEON (unpck, zip).
        using Indices = std::make_index_sequence<n>;
        KDLOSS_UNROLL
        for (std::size_t width = 1; width < n; width *= 2) {
            V next[n];
            KDLOSS_UNROLL
            for (std::size_t i = 0; i < n / 2; ++i) {
                next[2 * i] = interleave<false, V, n>(v[i], v[i + n / 2], Indices{});
                next[2 * i + 1] = interleave<true, V, n>(v[i], v[i + n / 2], Indices{});
            }
            KDLOSS_UNROLL
            for (std::size_t i = 0; i < n; ++i) v[i] = next[i];
        }
    }
}

// The columns [first, first + tile_width) of the block's rows, into lane-major `out`; each row's maximum
// so far, in `maxima`, is updated with them on the way.
template <class T>
KDLOSS_INLINE void rows_to_lanes_tile(const T* const (&rows)[lanes], std::size_t first, T* out,
                                      Pack<T>& maxima) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    for (std::size_t group = 0; group < lanes; group += n_tile) {
        Vector<T> v[n_tile];
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < n_tile; ++i) v[i] = load_vector(rows[group + i] + first);
        transpose_tile<T>(v);
        Vector<T>& maximum = maxima.part[group / n_tile];
        KDLOSS_UNROLL
        for (std::size_t c = 0; c < n_tile; ++c) {
            store_vector(out + (first + c) * lanes + group, v[c]);
            maximum = v[c] > maximum ? v[c] : maximum;  // as lane_maxima: a NaN is never the maximum
        }
    }
}

// The columns [first, first + tile_width) of lane-major `in`, into the first `count` rows.
template <class T>
KDLOSS_INLINE void lanes_to_rows_tile(const T* in, std::size_t first, T* const (&rows)[lanes],
                                      std::size_t count) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    for (std::size_t group = 0; group < count; group += n_tile) {
        Vector<T> v[n_tile];
        KDLOSS_UNROLL
        for (std::size_t c = 0; c < n_tile; ++c) v[c] = load_vector(in + (first + c) * lanes + group);
        transpose_tile<T>(v);
        if (count - group >= n_tile) {  // a whole tile of rows, with the loop unrolled (v stays in registers)
            KDLOSS_UNROLL
            for (std::size_t i = 0; i < n_tile; ++i) store_vector(rows[group + i] + first, v[i]);
        } else {
            for (std::size_t i = 0; i < count - group; ++i) store_vector(rows[group + i] + first, v[i]);
        }
    }
}

// As rows_to_lanes. Columns past the last whole tile are the tile of the last tile_width columns, which
// overlaps the one before and moves some values twice; rows shorter than a tile go value by value.
template <class T>
Pack<T> rows_to_lanes_by_shuffles(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    if (n < n_tile) {
        rows_to_lanes_one_by_one(rows, 0, n, out);
        return lane_maxima<T, false>(out, nullptr, n * lanes).student;
    }
    Pack<T> maxima(-std::numeric_limits<T>::infinity());
    for (std::size_t first = 0; first + n_tile <= n; first += n_tile) rows_to_lanes_tile(rows, first, out, maxima);
    if (n % n_tile != 0) rows_to_lanes_tile(rows, n - n_tile, out, maxima);
    return maxima;
}

// As lanes_to_rows, with the same overlapping last tile.
template <class T>
void lanes_to_rows_by_shuffles(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    if (n < n_tile) {
        lanes_to_rows_one_by_one(in, 0, n, rows, count);
        return;
    }
    for (std::size_t first = 0; first + n_tile <= n; first += n_tile) lanes_to_rows_tile(in, first, rows, count);
    if (n % n_tile != 0) lanes_to_rows_tile(in, n - n_tile, rows, count);
}

#endif

// out[c * lanes + l] = rows[l][c] for c < n; returns each row's maximum (lane l: row l's), which the
// shuffles find on the way, saving the kernel a pass.
template <class T>
Pack<T> rows_to_lanes(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    return rows_to_lanes_by_shuffles(rows, n, out);
#else
    return rows_to_lanes_by_tiles(rows, n, out);
#endif
}

// rows[l][c] = in[c * lanes + l] for c < n and the first `count` lanes.
template <class T>
void lanes_to_rows(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    lanes_to_rows_by_shuffles(in, n, rows, count);
#else
    lanes_to_rows_by_tiles(in, n, rows, count);
#endif
}


}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
