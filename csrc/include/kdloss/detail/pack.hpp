#pragma once

// Pack<T>: `lanes` values of T that the kernels operate on together, held in vector registers.
//
// With g++ and clang a Pack is an array of GNU vectors (vector_size) as wide as the target's registers:
// 16 floats are one zmm register with AVX-512, two ymm with AVX2, four xmm with SSE2 or NEON. (A single
// 16-lane vector would be simpler, but g++ lowers a conditional on a vector wider than the hardware's into
// scalar code.) The kernels were first written as loops over arrays of lanes for the auto-vectoriser; it did
// vectorise them, but kept every accumulator in memory and re-checked pointer aliasing on every block, which
// measured slower than the same arithmetic in registers. Compilers without GNU vectors (MSVC), and g++ and
// clang told to do without them (KDLOSS_NO_VECTOR_EXTENSIONS, which is how that path is tested), get the same
// array of registers written with the target's intrinsics (intrinsic_registers.hpp: x86 and AArch64; other
// targets need GNU vectors). Every operation is per lane, so both give the same bits where the compiler
// fuses the same multiply-adds.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"

// The kernels' small functions must be inlined into their loops, whatever the compiler's size heuristics
// think of a Pack's unrolled parts: a call per operation would spill every register. Their big functions
// must not be, nor be cloned for constant arguments: each is then compiled once, and every row runs through
// the same instructions whatever the call site, where two copies could differ in which a * b + c the
// compiler fuses into an FMA, and so in the last bit of a result (a row's gradient must not depend on the
// batch it came in; g++ -O3 did clone distill_block for full blocks, and did fuse differently).
// KDLOSS_INLINE_LAMBDA goes between a lambda's parameters and its body.
#if defined(__clang__)
#define KDLOSS_INLINE inline __attribute__((always_inline))
#define KDLOSS_INLINE_LAMBDA __attribute__((always_inline))
#define KDLOSS_NOINLINE __attribute__((noinline))
#elif defined(__GNUC__)
#define KDLOSS_INLINE inline __attribute__((always_inline))
#define KDLOSS_INLINE_LAMBDA __attribute__((always_inline))
#define KDLOSS_NOINLINE __attribute__((noinline, noclone))
#elif defined(_MSC_VER)
#define KDLOSS_INLINE __forceinline
#define KDLOSS_INLINE_LAMBDA [[msvc::forceinline]]
#define KDLOSS_NOINLINE __declspec(noinline)
#else
#define KDLOSS_INLINE inline
#define KDLOSS_INLINE_LAMBDA
#define KDLOSS_NOINLINE
#endif

// Hints to fetch the cache line at an address, to read it or to write it (keep in all levels); nothing where
// there is no builtin.
#if defined(__GNUC__) || defined(__clang__)
#define KDLOSS_PREFETCH(address) __builtin_prefetch(address)
#define KDLOSS_PREFETCH_TO_WRITE(address) __builtin_prefetch(address, 1)
#else
#define KDLOSS_PREFETCH(address) ((void)(address))
#define KDLOSS_PREFETCH_TO_WRITE(address) ((void)(address))
#endif

// Loops over a Pack's parts (or lanes) are unrolled whatever the optimisation level: at -O2 g++ kept them
// as loops over arrays on the stack, several times slower than at -O3, and hosts often build with -O2.
#if defined(__clang__)
#define KDLOSS_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KDLOSS_UNROLL _Pragma("GCC unroll 64")
#else
#define KDLOSS_UNROLL
#endif

#if (defined(__GNUC__) || defined(__clang__)) && !defined(KDLOSS_NO_VECTOR_EXTENSIONS)
#define KDLOSS_VECTOR_EXTENSIONS 1
#else
#define KDLOSS_VECTOR_EXTENSIONS 0
#include "kdloss/detail/intrinsic_registers.hpp"
#ifndef KDLOSS_INTRINSIC_REGISTERS
#error "kdloss: this compiler has no GNU vector extensions and this target no intrinsics kdloss knows (x86, AArch64)"
#endif
#endif
#ifndef KDLOSS_INTRINSIC_REGISTERS
#define KDLOSS_INTRINSIC_REGISTERS 0
#endif

// __builtin_shufflevector: clang, and g++ from 12.
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

// Intrinsics for what GNU vectors cannot express: lookup()'s permutes and fused_multiply_add.
#if KDLOSS_VECTOR_EXTENSIONS && (defined(__AVX512F__) || defined(__AVX2__) || defined(__FMA__))
#include <immintrin.h>
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__aarch64__)
#include <arm_neon.h>
#endif

// A Pack's a * b + c is fused into one multiply-add where the target has it, as a scalar's is: the kernels'
// exactness arguments count on it (simd_math.hpp's reduction, for one). g++ fuses across statements by
// default; clang fuses only within one expression, and a Pack's operators are separate functions, so it
// is told to here, for this file's operators alone.
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(fast)
#endif

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// The unsigned integer of the same width as T, for bit manipulation.
template <class T>
using BitsOf = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

#if KDLOSS_VECTOR_EXTENSIONS
#if defined(__AVX512F__)
inline constexpr std::size_t vector_bytes = 64;
#elif defined(__AVX__)
inline constexpr std::size_t vector_bytes = 32;
#else
inline constexpr std::size_t vector_bytes = 16;  // SSE2, NEON
#endif
// One register's worth of T, and the same as it may lie in memory: at any address of a T, aliasing T.
// (Loading a whole Pack by memcpy instead made g++ -mavx2 go through the stack in 16-byte pieces.)
template <class T>
struct PartOf {
    typedef T type __attribute__((vector_size(vector_bytes)));
    typedef T unaligned __attribute__((vector_size(vector_bytes), aligned(alignof(T)), may_alias));
};
#else
inline constexpr std::size_t vector_bytes = register_bytes;
template <class T>
struct PartOf {
    using type = Register<T>;
};
#endif

template <class T>
inline constexpr std::size_t lanes_per_part = vector_bytes / sizeof(T);
template <class T>
inline constexpr std::size_t parts = lanes / lanes_per_part<T>;

// The result of comparing two Packs lane by lane: integer vectors of all ones where the comparison holds
// (RegisterMasks without vector extensions).
template <class T>
struct Mask {
    using Part = decltype(typename PartOf<T>::type{} < typename PartOf<T>::type{});
    Part part[parts<T>];

    friend KDLOSS_INLINE Mask operator|(const Mask& a, const Mask& b) noexcept {
        Mask r;
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) r.part[i] = a.part[i] | b.part[i];
        return r;
    }
};

template <class T>
struct Pack {
    using Part = typename PartOf<T>::type;
    Part part[parts<T>];

    KDLOSS_INLINE Pack() noexcept : part() {}
    // Implicit, so that constants mix with Packs in expressions: p * r + 0.5f.
    KDLOSS_INLINE Pack(T x) noexcept {  // NOLINT(google-explicit-constructor)
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) {
#if KDLOSS_VECTOR_EXTENSIONS
            part[i] = Part{} + x;
#else
            part[i] = Part(x);
#endif
        }
    }

    static KDLOSS_INLINE Pack load(const T* p) noexcept {
        Pack result;
#if KDLOSS_VECTOR_EXTENSIONS
        using Unaligned = typename PartOf<T>::unaligned;
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i)
            result.part[i] = *reinterpret_cast<const Unaligned*>(p + i * lanes_per_part<T>);
#else
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) result.part[i] = Part::load(p + i * lanes_per_part<T>);
#endif
        return result;
    }
    KDLOSS_INLINE void store(T* p) const noexcept {
#if KDLOSS_VECTOR_EXTENSIONS
        using Unaligned = typename PartOf<T>::unaligned;
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) *reinterpret_cast<Unaligned*>(p + i * lanes_per_part<T>) = part[i];
#else
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) part[i].store(p + i * lanes_per_part<T>);
#endif
    }

    T operator[](std::size_t lane) const noexcept {
        T values[lanes];
        std::memcpy(values, &part, sizeof values);
        return values[lane];
    }

#define KDLOSS_PACK_OP(op)                                                                           \
    friend KDLOSS_INLINE Pack operator op(const Pack& a, const Pack& b) noexcept {                   \
        Pack r;                                                                                      \
        KDLOSS_UNROLL for (std::size_t i = 0; i < parts<T>; ++i) r.part[i] = a.part[i] op b.part[i]; \
        return r;                                                                                    \
    }
#define KDLOSS_PACK_COMPARE(op)                                                                      \
    friend KDLOSS_INLINE Mask<T> operator op(const Pack& a, const Pack& b) noexcept {                \
        Mask<T> r;                                                                                   \
        KDLOSS_UNROLL for (std::size_t i = 0; i < parts<T>; ++i) r.part[i] = a.part[i] op b.part[i]; \
        return r;                                                                                    \
    }
    KDLOSS_PACK_OP(+)
    KDLOSS_PACK_OP(-)
    KDLOSS_PACK_OP(*)
    KDLOSS_PACK_OP(/)
    KDLOSS_PACK_OP(&)
    KDLOSS_PACK_OP(|)
    KDLOSS_PACK_COMPARE(<)
    KDLOSS_PACK_COMPARE(>)
    KDLOSS_PACK_COMPARE(<=)
    KDLOSS_PACK_COMPARE(==)
    KDLOSS_PACK_COMPARE(!=)
#undef KDLOSS_PACK_OP
#undef KDLOSS_PACK_COMPARE

    KDLOSS_INLINE Pack& operator+=(const Pack& b) noexcept { return *this = *this + b; }
    friend KDLOSS_INLINE Pack operator<<(const Pack& a, int shift) noexcept {
        Pack r;
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) r.part[i] = a.part[i] << shift;
        return r;
    }
    friend KDLOSS_INLINE Pack operator>>(const Pack& a, int shift) noexcept {
        Pack r;
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) r.part[i] = a.part[i] >> shift;
        return r;
    }

    // The lanes added pairwise in a fixed order, a tree four additions deep: the upper half of the lanes
    // onto the lower, until one is left. A sum then never depends on the vector width in use. (In
    // registers, a part onto a part and then half a register onto the other: a row's few sums are part
    // of every row's fixed cost.)
    KDLOSS_INLINE T sum() const noexcept {
        return reduce([](auto a, auto b) KDLOSS_INLINE_LAMBDA { return a + b; });
    }
    // The largest lane, of lanes that hold no NaN (as the maxima's select guarantees: it never picks one).
    KDLOSS_INLINE T max() const noexcept {
        return reduce([](auto a, auto b) KDLOSS_INLINE_LAMBDA { return b > a ? b : a; });
    }

private:
    template <class Op>
    KDLOSS_INLINE T reduce(Op op) const noexcept {
#if KDLOSS_VECTOR_SHUFFLES
        Part level[parts<T>];
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<T>; ++i) level[i] = part[i];
        KDLOSS_UNROLL
        for (std::size_t width = parts<T> / 2; width > 0; width /= 2) {
            KDLOSS_UNROLL
            for (std::size_t i = 0; i < width; ++i) level[i] = op(level[i], level[i + width]);
        }
        return reduce_lanes(level[0], op, std::make_index_sequence<lanes_per_part<T> / 2>{});
#else
        T level[lanes];
        std::memcpy(level, &part, sizeof level);
        for (std::size_t width = lanes / 2; width > 0; width /= 2)
            for (std::size_t i = 0; i < width; ++i) level[i] = op(level[i], level[i + width]);
        return level[0];
#endif
    }
#if KDLOSS_VECTOR_SHUFFLES
    // The upper half of a vector's n lanes onto the lower (I = 0 .. n/2 - 1), down to one lane.
    template <class Vector, class Op, std::size_t... I>
    static KDLOSS_INLINE T reduce_lanes(Vector v, Op op, std::index_sequence<I...>) noexcept {
        constexpr std::size_t half = sizeof...(I);
        if constexpr (half == 1) {
            return op(v[0], v[1]);
        } else {
            const auto folded = op(__builtin_shufflevector(v, v, I...), __builtin_shufflevector(v, v, (I + half)...));
            return reduce_lanes(folded, op, std::make_index_sequence<half / 2>{});
        }
    }
#endif
};

template <class To, class From>
inline To bits_as(From value) noexcept {
    static_assert(sizeof(To) == sizeof(From));
    To result;
    std::memcpy(&result, &value, sizeof result);
    return result;
}

// The bits of x as unsigned integers, and back: for scalars and for Packs alike, so that the maths in
// simd_math.hpp is written once.
template <class To, class From>
KDLOSS_INLINE Pack<To> reinterpret(const Pack<From>& x) noexcept {
    static_assert(sizeof(To) == sizeof(From));
    Pack<To> result;
#if KDLOSS_VECTOR_EXTENSIONS
    std::memcpy(&result.part, &x.part, sizeof result.part);
#else
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < parts<To>; ++i) {
        if constexpr (std::is_floating_point_v<From>) result.part[i] = bits_of(x.part[i]);
        else result.part[i] = from_bits_of(x.part[i]);
    }
#endif
    return result;
}
inline std::uint32_t to_bits(float x) noexcept { return bits_as<std::uint32_t>(x); }
inline std::uint64_t to_bits(double x) noexcept { return bits_as<std::uint64_t>(x); }
template <class T>
KDLOSS_INLINE Pack<BitsOf<T>> to_bits(const Pack<T>& x) noexcept {
    return reinterpret<BitsOf<T>>(x);
}
inline float from_bits(std::uint32_t bits) noexcept { return bits_as<float>(bits); }
inline double from_bits(std::uint64_t bits) noexcept { return bits_as<double>(bits); }
KDLOSS_INLINE Pack<float> from_bits(const Pack<std::uint32_t>& bits) noexcept { return reinterpret<float>(bits); }
KDLOSS_INLINE Pack<double> from_bits(const Pack<std::uint64_t>& bits) noexcept { return reinterpret<double>(bits); }

// |x| lane by lane, by its sign bit (NaN stays NaN).
template <class T>
KDLOSS_INLINE Pack<T> magnitude(const Pack<T>& x) noexcept {
    return from_bits(to_bits(x) & (~BitsOf<T>(0) >> 1));
}

// condition ? if_true : if_false, without a branch: for scalars by bit masks, for Packs lane by lane.
template <class T>
inline T select(bool condition, T if_true, T if_false) noexcept {
    const BitsOf<T> mask = BitsOf<T>(0) - static_cast<BitsOf<T>>(condition);
    return from_bits((to_bits(if_true) & mask) | (to_bits(if_false) & ~mask));
}
template <class T>
struct Identity {
    using type = T;
};
// T is deduced from the mask alone, so either value may be a scalar constant. A vector conditional, which
// the compiler turns into a blend, a masked operation or a max.
template <class T>
KDLOSS_INLINE Pack<T> select(const Mask<T>& condition, const typename Identity<Pack<T>>::type& if_true,
                             const typename Identity<Pack<T>>::type& if_false) noexcept {
    Pack<T> r;
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < parts<T>; ++i) {
#if KDLOSS_VECTOR_EXTENSIONS
        r.part[i] = condition.part[i] ? if_true.part[i] : if_false.part[i];
#else
        r.part[i] = blend(condition.part[i], if_true.part[i], if_false.part[i]);
#endif
    }
    return r;
}

// The scalar type of a scalar or of a Pack.
template <class V>
struct ScalarOfT {
    using type = V;
};
template <class T>
struct ScalarOfT<Pack<T>> {
    using type = T;
};
template <class V>
using ScalarOf = typename ScalarOfT<V>::type;

#if KDLOSS_VECTOR_EXTENSIONS
// Half a float part: its first (which = 0) or second half of lanes. (A memcpy of it went through the stack.)
typedef float HalfPart __attribute__((vector_size(vector_bytes / 2)));
#if KDLOSS_VECTOR_SHUFFLES
template <std::size_t... I>
KDLOSS_INLINE HalfPart half_of(const PartOf<float>::type& part, std::size_t which, std::index_sequence<I...>) noexcept {
    constexpr std::size_t n = sizeof...(I);
    return which == 0 ? __builtin_shufflevector(part, part, I...) : __builtin_shufflevector(part, part, (I + n)...);
}
KDLOSS_INLINE HalfPart half_of(const PartOf<float>::type& part, std::size_t which) noexcept {
    return half_of(part, which, std::make_index_sequence<lanes_per_part<float> / 2>{});
}
#else
KDLOSS_INLINE HalfPart half_of(const PartOf<float>::type& part, std::size_t which) noexcept {
    HalfPart half;
    std::memcpy(&half, reinterpret_cast<const char*>(&part) + which * sizeof half, sizeof half);
    return half;
}
#endif
#endif

// The lanes of a float Pack as doubles.
KDLOSS_INLINE Pack<double> widen(const Pack<float>& x) noexcept {
    Pack<double> result;
#if KDLOSS_VECTOR_EXTENSIONS
    // Each float part is two double parts: convert its halves.
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < parts<double>; ++i)
        result.part[i] = __builtin_convertvector(half_of(x.part[i / 2], i % 2), Pack<double>::Part);
#else
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < parts<double>; ++i)
        result.part[i] = Register<double>(widen_half(x.part[i / 2].v, i % 2));
#endif
    return result;
}
KDLOSS_INLINE Pack<double> widen(const Pack<double>& x) noexcept { return x; }

// Doubles rounded to T, lane by lane; a scalar is broadcast.
template <class T>
KDLOSS_INLINE Pack<T> narrow(double x) noexcept {
    return Pack<T>(static_cast<T>(x));
}
template <class T>
KDLOSS_INLINE Pack<T> narrow(const Pack<double>& x) noexcept {
    if constexpr (std::is_same_v<T, double>) {
        return x;
    } else {
        Pack<float> result;
#if KDLOSS_VECTOR_EXTENSIONS
        // Each double part is half a float part.
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<double>; ++i) {
            const HalfPart half = __builtin_convertvector(x.part[i], HalfPart);
            std::memcpy(reinterpret_cast<char*>(&result.part) + i * sizeof half, &half, sizeof half);
        }
#else
        KDLOSS_UNROLL
        for (std::size_t i = 0; i < parts<float>; ++i)
            result.part[i] = Register<float>(narrow_pair(x.part[2 * i].v, x.part[2 * i + 1].v));
#endif
        return result;
    }
}

// a * b + c rounded once, lane by lane, where the target has fused multiply-adds (FMA3 and AVX-512 on
// x86-64, and aarch64), and rounded twice elsewhere: for the few places whose exactness rests on it, which
// cannot leave it to the compiler (clang, for one, does not fuse a product that has two uses), and for the
// exponential's polynomial steps, which g++ and clang fuse by themselves but a compiler that does not fuse
// intrinsics (MSVC) would not (a float64 call took 1.4x as long there: benchmarks/cpp_backends.py's unfused).
template <class T>
KDLOSS_INLINE Pack<T> fused_multiply_add(const Pack<T>& a, const Pack<T>& b, const Pack<T>& c) noexcept {
    Pack<T> r;
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < parts<T>; ++i) {
        [[maybe_unused]] constexpr bool is_float = std::is_same_v<T, float>;
#if KDLOSS_VECTOR_EXTENSIONS && defined(__AVX512F__)
        if constexpr (is_float) r.part[i] = _mm512_fmadd_ps(a.part[i], b.part[i], c.part[i]);
        else r.part[i] = _mm512_fmadd_pd(a.part[i], b.part[i], c.part[i]);
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__FMA__) && defined(__AVX__)
        if constexpr (is_float) r.part[i] = _mm256_fmadd_ps(a.part[i], b.part[i], c.part[i]);
        else r.part[i] = _mm256_fmadd_pd(a.part[i], b.part[i], c.part[i]);
#elif KDLOSS_VECTOR_EXTENSIONS && defined(__aarch64__)
        if constexpr (is_float) r.part[i] = vfmaq_f32(c.part[i], a.part[i], b.part[i]);
        else r.part[i] = vfmaq_f64(c.part[i], a.part[i], b.part[i]);
#elif !KDLOSS_VECTOR_EXTENSIONS
        r.part[i] = fused_multiply_add(a.part[i], b.part[i], c.part[i]);  // intrinsic_registers.hpp's
#else
        r.part[i] = a.part[i] * b.part[i] + c.part[i];
#endif
    }
    return r;
}

// Table lookup across registers: lane i of the result is table[index[i] % lookup_entries<U>], for U a 32- or
// 64-bit unsigned integer and the table held in a Pack's first lanes. It is one permute instruction a part
// where the target has one whose table fills a register or two: AVX-512 (16 entries of either width) and
// AVX2 (8 of 32 bits). Elsewhere lookup_entries is 0 and there is no lookup: SSE2 has no variable permute,
// and clang has no vector-extension builtin for one, hence the intrinsics.
template <class U>
inline constexpr std::size_t lookup_entries = 0;

// A part of integers as the intrinsics' type, and back: the permutes below, for both kinds of part.
template <class Native, class Part>
KDLOSS_INLINE Native as_native(const Part& part) noexcept {
#if KDLOSS_VECTOR_EXTENSIONS
    return reinterpret_cast<Native>(part);
#else
    return part.v;
#endif
}
template <class U, class Native>
KDLOSS_INLINE typename Pack<U>::Part from_native(const Native& native) noexcept {
#if KDLOSS_VECTOR_EXTENSIONS
    return reinterpret_cast<typename Pack<U>::Part>(native);
#else
    return typename Pack<U>::Part(native);
#endif
}

#if (KDLOSS_VECTOR_EXTENSIONS || defined(KDLOSS_X86_REGISTERS)) && defined(__AVX512F__)
template <>
inline constexpr std::size_t lookup_entries<std::uint32_t> = 16;
template <>
inline constexpr std::size_t lookup_entries<std::uint64_t> = 16;
KDLOSS_INLINE Pack<std::uint32_t> lookup(const Pack<std::uint32_t>& table, const Pack<std::uint32_t>& index) noexcept {
    static_assert(parts<std::uint32_t> == 1);
    Pack<std::uint32_t> r;
    // The zero-masked form with every lane set is the same instruction; the plain one makes g++ 12 warn of
    // its own placeholder operand (-Wmaybe-uninitialized).
    r.part[0] = from_native<std::uint32_t>(_mm512_maskz_permutexvar_epi32(
        __mmask16(0xffff), as_native<__m512i>(index.part[0]), as_native<__m512i>(table.part[0])));
    return r;
}
KDLOSS_INLINE Pack<std::uint64_t> lookup(const Pack<std::uint64_t>& table, const Pack<std::uint64_t>& index) noexcept {
    static_assert(parts<std::uint64_t> == 2);
    Pack<std::uint64_t> r;
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < 2; ++i)
        r.part[i] = from_native<std::uint64_t>(_mm512_permutex2var_epi64(
            as_native<__m512i>(table.part[0]), as_native<__m512i>(index.part[i]), as_native<__m512i>(table.part[1])));
    return r;
}
#elif (KDLOSS_VECTOR_EXTENSIONS || defined(KDLOSS_X86_REGISTERS)) && defined(__AVX2__)
template <>
inline constexpr std::size_t lookup_entries<std::uint32_t> = 8;
KDLOSS_INLINE Pack<std::uint32_t> lookup(const Pack<std::uint32_t>& table, const Pack<std::uint32_t>& index) noexcept {
    static_assert(parts<std::uint32_t> == 2);
    Pack<std::uint32_t> r;
    KDLOSS_UNROLL
    for (std::size_t i = 0; i < 2; ++i)
        r.part[i] = from_native<std::uint32_t>(
            _mm256_permutevar8x32_epi32(as_native<__m256i>(table.part[0]), as_native<__m256i>(index.part[i])));
    return r;
}
#endif

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail

#if defined(__clang__)
#pragma float_control(pop)
#endif
