#pragma once

// Moving a block of `lanes` short rows into the lane-major layout of distill_block (element c of the row
// in lane l at out[c * lanes + l]) and back. Element by element, this measured the most expensive part of
// a block of 100-class rows, so whole tiles are transposed at once, in one of two ways:
//   - by tiles: tiles of lanes x lanes values go through a local array with constant loop bounds, which
//     compilers that vectorise at all turn into permutes;
//   - by shuffles (g++ >= 12, clang; and the intrinsics of intrinsic_registers.hpp): tiles of V x V values, V
//     the values in one register, are loaded as V vectors and transposed by rounds of shuffles that each map
//     onto one instruction of the target (with AVX-512 and GNU vectors, the first round is done by the loads).
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

#if KDLOSS_VECTOR_SHUFFLES || KDLOSS_INTRINSIC_REGISTERS
#define KDLOSS_TRANSPOSE_BY_SHUFFLES 1
// The values of one register, and their number.
template <class T>
using Vector = typename PartOf<T>::type;
template <class T>
inline constexpr std::size_t tile_width = lanes_per_part<T>;

// Unaligned vector loads and stores (a memcpy of a vector goes through the stack in 16-byte pieces with
// g++ -mavx2), and the larger of two, lane by lane, as lane_maxima takes it (a NaN is never the maximum).
template <class T>
KDLOSS_INLINE Vector<T> load_vector(const T* p) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    return *reinterpret_cast<const typename PartOf<T>::unaligned*>(p);
#else
    return Vector<T>::load(p);
#endif
}
template <class T>
KDLOSS_INLINE void store_vector(T* p, const Vector<T>& v) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    *reinterpret_cast<typename PartOf<T>::unaligned*>(p) = v;
#else
    v.store(p);
#endif
}
template <class V>
KDLOSS_INLINE V larger_of(const V& candidate, const V& maximum) noexcept {
#if KDLOSS_VECTOR_SHUFFLES
    return candidate > maximum ? candidate : maximum;
#else
    return blend(candidate > maximum, candidate, maximum);
#endif
}

#if KDLOSS_VECTOR_SHUFFLES

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
        for (std::size_t g = 0; g < 8; g += 4) KDLOSS_UNROLL
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

#elif KDLOSS_INTRINSIC_REGISTERS
// The same transposes with intrinsics: rows v[0 .. tile_width) in, columns out.
template <class T>
KDLOSS_INLINE void transpose_tile(Vector<T> (&v)[tile_width<T>]) noexcept {
    constexpr std::size_t n = tile_width<T>;
    using V = Vector<T>;
#if defined(KDLOSS_X86_REGISTERS) && defined(__AVX2__) && !defined(__AVX512F__)
    if constexpr (n == 8) {
        // 8 floats: unpcklps/unpckhps, shufps, vperm2f128, as the GNU path's shuffles become.
        __m256 t[8], u[8];
        KDLOSS_UNROLL
        for (std::size_t k = 0; k < 4; ++k) {
            t[2 * k] = _mm256_unpacklo_ps(v[2 * k].v, v[2 * k + 1].v);
            t[2 * k + 1] = _mm256_unpackhi_ps(v[2 * k].v, v[2 * k + 1].v);
        }
        KDLOSS_UNROLL
        for (std::size_t g = 0; g < 8; g += 4) KDLOSS_UNROLL
        for (std::size_t k = 0; k < 2; ++k) {
            u[g + 2 * k] = _mm256_shuffle_ps(t[g + k], t[g + k + 2], 0x44);
            u[g + 2 * k + 1] = _mm256_shuffle_ps(t[g + k], t[g + k + 2], 0xee);
        }
        KDLOSS_UNROLL
        for (std::size_t j = 0; j < 4; ++j) {
            v[j] = V(_mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
            v[j + 4] = V(_mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
        }
    } else {
        // 4 doubles: unpcklpd/unpckhpd, then vperm2f128.
        const __m256d t0 = _mm256_unpacklo_pd(v[0].v, v[1].v), t1 = _mm256_unpackhi_pd(v[0].v, v[1].v);
        const __m256d t2 = _mm256_unpacklo_pd(v[2].v, v[3].v), t3 = _mm256_unpackhi_pd(v[2].v, v[3].v);
        v[0] = V(_mm256_permute2f128_pd(t0, t2, 0x20));
        v[1] = V(_mm256_permute2f128_pd(t1, t3, 0x20));
        v[2] = V(_mm256_permute2f128_pd(t0, t2, 0x31));
        v[3] = V(_mm256_permute2f128_pd(t1, t3, 0x31));
    }
#else
    // log2(n) rounds of pairing row i with row i + n/2 by interleaves: the first (or second) halves of a and b,
    // a0 b0 a1 b1 ...: vpermt2ps/pd with AVX-512, unpcklps/pd (unpckh) with SSE2, zip1 (zip2) with NEON.
    auto interleave = [](const V& a, const V& b, bool high) KDLOSS_INLINE_LAMBDA {
#if defined(KDLOSS_X86_REGISTERS) && defined(__AVX512F__)
        if constexpr (n == 16) {
            const __m512i low_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            const __m512i high_half = _mm512_add_epi32(low_half, _mm512_set1_epi32(8));
            return V(_mm512_permutex2var_ps(a.v, high ? high_half : low_half, b.v));
        } else {
            const __m512i low_half = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
            const __m512i high_half = _mm512_add_epi64(low_half, _mm512_set1_epi64(4));
            return V(_mm512_permutex2var_pd(a.v, high ? high_half : low_half, b.v));
        }
#elif defined(KDLOSS_X86_REGISTERS)
        if constexpr (n == 4) return V(high ? _mm_unpackhi_ps(a.v, b.v) : _mm_unpacklo_ps(a.v, b.v));
        else return V(high ? _mm_unpackhi_pd(a.v, b.v) : _mm_unpacklo_pd(a.v, b.v));
#else
        if constexpr (n == 4) return V(high ? vzip2q_f32(a.v, b.v) : vzip1q_f32(a.v, b.v));
        else return V(high ? vzip2q_f64(a.v, b.v) : vzip1q_f64(a.v, b.v));
#endif
    };
    KDLOSS_UNROLL
    for (std::size_t width = 1; width < n; width *= 2) {
        V next[n];
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < n / 2; ++i) {
            next[2 * i] = interleave(v[i], v[i + n / 2], false);
            next[2 * i + 1] = interleave(v[i], v[i + n / 2], true);
        }
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < n; ++i) v[i] = next[i];
    }
#endif
}
#endif

#if KDLOSS_VECTOR_SHUFFLES && defined(__AVX512F__)
// A register of the 32 bytes at low, then the 32 at high. By intrinsics: g++ 12 turned the same
// concatenation of two vectors into two loads and a shuff64x2, where vinsertf64x4 takes its half from memory.
template <class T>
KDLOSS_INLINE Vector<T> load_halves(const T* low, const T* high) noexcept {
    // (_mm512_insertf64x4 itself passes an undefined vector that g++ 12 warns of; all-ones merge is the same.)
    const __m512d lower = _mm512_castpd256_pd512(_mm256_loadu_pd(reinterpret_cast<const double*>(low)));
    const __m256d upper = _mm256_loadu_pd(reinterpret_cast<const double*>(high));
    return (Vector<T>)_mm512_mask_insertf64x4(lower, 0xff, lower, upper, 1);
}

// Index patterns of the shuffles below, element i of the result from a (< n) or b (>= n); L values to a
// 16-byte lane. `Unpack`: unpcklps/pd (High: unpckh), `Pairs`: shufps 0x44 (0xee) on floats, `Lanes`:
// shuff32x4/64x2 taking lanes 0, 2 (1, 3) of a then of b.
template <class T, bool High>
struct Unpack {
    static constexpr std::size_t n = tile_width<T>, L = 16 / sizeof(T);
    static constexpr std::size_t at(std::size_t i) {
        return (i % 2 ? n : 0) + i / L * L + (High ? L / 2 : 0) + i % L / 2;
    }
};
template <class T, bool High>
struct Pairs {
    static constexpr std::size_t n = tile_width<T>;
    static constexpr std::size_t at(std::size_t i) { return (i % 4 / 2 ? n : 0) + i / 4 * 4 + (High ? 2 : 0) + i % 2; }
};
template <class T, bool High>
struct Lanes {
    static constexpr std::size_t n = tile_width<T>, L = 16 / sizeof(T);
    static constexpr std::size_t at(std::size_t i) {
        return (i / L / 2 ? n : 0) + (i / L % 2 * 2 + (High ? 1 : 0)) * L + i % L;
    }
};
template <class Pattern, class V, std::size_t... I>
KDLOSS_INLINE V shuffle(V a, V b, std::index_sequence<I...>) noexcept {
    return __builtin_shufflevector(a, b, Pattern::at(I)...);
}
#endif

// Loads the tile whose row i is the tile_width values at src[i] and transposes it: v[j] then holds column j.
template <class T>
KDLOSS_INLINE void load_transposed_tile(const T* const (&src)[tile_width<T>], Vector<T> (&v)[tile_width<T>]) noexcept {
    constexpr std::size_t n = tile_width<T>;
#if KDLOSS_VECTOR_SHUFFLES && defined(__AVX512F__)
    if constexpr (vector_bytes == 64) {
        // AVX-512: the round of 32-byte halves is done by the loads (vinsertf64x4 from memory), which
        // takes a round off the shuffle units that bound the transposes, and the rounds left are unpck,
        // shufps and shuff64x2/32x4 rather than the generic rounds' vpermt2ps/pd, which are slower. (Loading
        // 16-byte quarters too, leaving only the in-lane rounds, measured slower: an insert from memory is not
        // free either.) The loads pair rows r and
        // r + n/4, not r + n/2: shuff64x2/32x4 moves the half it reads into the 16-byte lane's place, so
        // that pairing puts each row in its lane of the column.
        using V = Vector<T>;
        using Indices = std::make_index_sequence<n>;
        constexpr std::size_t h = n / 2, q = n / 4;
        V t[n], u[n];
        // t[k]: the rows k % q + k / q % 2 * n / 2 and that + q, their values k / h * h onwards.
        KDLOSS_UNROLL
        for (std::size_t k = 0; k < n; ++k) {
            const std::size_t row = k % q + k / q % 2 * h, column = k / h * h;
            t[k] = load_halves(src[row] + column, src[row + q] + column);
        }
        // Pairing rows r and r + 1 (and r + 2, floats) within 16-byte lanes.
        KDLOSS_UNROLL
        for (std::size_t k = 0; k < n; k += 2) {
            u[k] = shuffle<Unpack<T, false>>(t[k], t[k + 1], Indices{});
            u[k + 1] = shuffle<Unpack<T, true>>(t[k], t[k + 1], Indices{});
        }
        if constexpr (n == 16) {
            KDLOSS_UNROLL
            for (std::size_t k = 0; k < n; ++k)
                if (k % 4 < 2) {
                    t[k] = shuffle<Pairs<T, false>>(u[k], u[k + 2], Indices{});
                    t[k + 2] = shuffle<Pairs<T, true>>(u[k], u[k + 2], Indices{});
                }
        } else {
            KDLOSS_UNROLL
            for (std::size_t k = 0; k < n; ++k) t[k] = u[k];
        }
        // Pairing rows r and r + n/2 by 16-byte lanes. t[k]'s columns are (floats: k's two low bits
        // swapped) k % q + k / h * h, and q on from there for the second shuffle.
        KDLOSS_UNROLL
        for (std::size_t k = 0; k < n; ++k)
            if (k / q % 2 == 0) {
                const std::size_t column = (n == 16 ? k % 2 * 2 + k / 2 % 2 : k % q) + k / h * h;
                v[column] = shuffle<Lanes<T, false>>(t[k], t[k + q], Indices{});
                v[column + q] = shuffle<Lanes<T, true>>(t[k], t[k + q], Indices{});
            }
    } else
#endif
    {
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < n; ++i) v[i] = load_vector(src[i]);
        transpose_tile<T>(v);
    }
}

// The columns [first, first + tile_width) of the block's rows, into lane-major `out`; each row's maximum
// so far, in `maxima`, is updated with them on the way.
template <class T>
KDLOSS_INLINE void rows_to_lanes_tile(const T* const (&rows)[lanes], std::size_t first, T* out,
                                      Pack<T>& maxima) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    for (std::size_t group = 0; group < lanes; group += n_tile) {
        const T* src[n_tile];
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < n_tile; ++i) src[i] = rows[group + i] + first;
        Vector<T> v[n_tile];
        load_transposed_tile<T>(src, v);
        Vector<T>& maximum = maxima.part[group / n_tile];
        KDLOSS_UNROLL
        for (std::size_t c = 0; c < n_tile; ++c) {
            store_vector(out + (first + c) * lanes + group, v[c]);
            maximum = larger_of(v[c], maximum);
        }
    }
}

// The columns [first, first + tile_width) of lane-major `in`, into the first `count` rows.
template <class T>
KDLOSS_INLINE void lanes_to_rows_tile(const T* in, std::size_t first, T* const (&rows)[lanes],
                                      std::size_t count) noexcept {
    constexpr std::size_t n_tile = tile_width<T>;
    for (std::size_t group = 0; group < count; group += n_tile) {
        const T* src[n_tile];
        KDLOSS_UNROLL
        for (std::size_t c = 0; c < n_tile; ++c) src[c] = in + (first + c) * lanes + group;
        Vector<T> v[n_tile];
        load_transposed_tile<T>(src, v);
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

#endif  // KDLOSS_TRANSPOSE_BY_SHUFFLES

// out[c * lanes + l] = rows[l][c] for c < n; returns each row's maximum (lane l: row l's), which the
// shuffles find on the way, saving the kernel a pass.
template <class T>
Pack<T> rows_to_lanes(const T* const (&rows)[lanes], std::size_t n, T* out) noexcept {
#if KDLOSS_TRANSPOSE_BY_SHUFFLES
    return rows_to_lanes_by_shuffles(rows, n, out);
#else
    return rows_to_lanes_by_tiles(rows, n, out);
#endif
}

// rows[l][c] = in[c * lanes + l] for c < n and the first `count` lanes.
template <class T>
void lanes_to_rows(const T* in, std::size_t n, T* const (&rows)[lanes], std::size_t count) noexcept {
#if KDLOSS_TRANSPOSE_BY_SHUFFLES
    lanes_to_rows_by_shuffles(in, n, rows, count);
#else
    lanes_to_rows_by_tiles(in, n, rows, count);
#endif
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
