#pragma once

// Register<T>: one vector register of T, for compilers without GNU vector extensions (MSVC), which pack.hpp
// builds its Packs from instead of GNU vectors. Written with the x86 (SSE2, AVX2 with FMA, AVX-512F) and
// AArch64 (NEON) intrinsics that MSVC, g++ and clang all have, so that g++ and clang build and test it here
// (KDLOSS_NO_VECTOR_EXTENSIONS). Each operation is the one instruction that a GNU vector's operator becomes,
// so that both paths run the same arithmetic: the same bits, but where a compiler fuses a * b + c by itself.
//
// The natives are wrapped in a struct of their own for each T: MSVC's are unions that the overloads could not
// tell apart (every NEON type is one __n128), and an operator needs a class type to be declared for.
//
// Register<float> and Register<double> have the arithmetic, comparisons (to a RegisterMask<T>) and blend;
// Register<std::uint32_t> and Register<std::uint64_t> (the bits of floats and doubles, simd_math.hpp's) have
// addition, subtraction, and, or and shifts; bits_of and from_bits_of turn one into the other.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kdloss/detail/kernel_namespace.hpp"

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__) || defined(_M_X64) || \
    (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#define KDLOSS_X86_REGISTERS 1
#include <immintrin.h>
#elif defined(__aarch64__) || defined(_M_ARM64)
#define KDLOSS_NEON_REGISTERS 1
#include <arm_neon.h>
#endif

#if defined(KDLOSS_X86_REGISTERS) || defined(KDLOSS_NEON_REGISTERS)
#define KDLOSS_INTRINSIC_REGISTERS 1

#if defined(_MSC_VER) && !defined(__clang__)
#define KDLOSS_REGISTER_INLINE __forceinline
#else
#define KDLOSS_REGISTER_INLINE inline __attribute__((always_inline))
#endif

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class T>
struct Register;
template <class T>
struct RegisterMask;

#if defined(KDLOSS_X86_REGISTERS)

// The widest registers the target has, and the intrinsics' prefix for them (and and or by their whole names: as
// macro arguments, `and` and `or` are C++'s alternative tokens for && and ||). AVX without AVX2 has no 256-bit
// integer operations, so it gets SSE2's 128 bits (as g++ -mavx does not: the GNU path is 256 bits there).
#if defined(__AVX512F__)
inline constexpr std::size_t register_bytes = 64;
#define KDLOSS_MM(name) _mm512_##name
#define KDLOSS_SI(name) _mm512_##name##_si512
#define KDLOSS_AND _mm512_and_si512
#define KDLOSS_OR _mm512_or_si512
using NativeFloat = __m512;
using NativeDouble = __m512d;
using NativeInteger = __m512i;
#elif defined(__AVX2__)
inline constexpr std::size_t register_bytes = 32;
#define KDLOSS_MM(name) _mm256_##name
#define KDLOSS_SI(name) _mm256_##name##_si256
#define KDLOSS_AND _mm256_and_si256
#define KDLOSS_OR _mm256_or_si256
using NativeFloat = __m256;
using NativeDouble = __m256d;
using NativeInteger = __m256i;
#else
inline constexpr std::size_t register_bytes = 16;
#define KDLOSS_MM(name) _mm_##name
#define KDLOSS_SI(name) _mm_##name##_si128
#define KDLOSS_AND _mm_and_si128
#define KDLOSS_OR _mm_or_si128
using NativeFloat = __m128;
using NativeDouble = __m128d;
using NativeInteger = __m128i;
#endif

// Fused multiply-adds: FMA3 comes with AVX2 on every x86 CPU that has it (MSVC's /arch:AVX2 assumes it and
// defines no __FMA__), and AVX-512F has its own.
#if defined(__AVX512F__) || defined(__FMA__) || (defined(_MSC_VER) && defined(__AVX2__))
#define KDLOSS_REGISTER_FMA 1
#endif

// A comparison's result: a bit a lane with AVX-512, else a register of all-ones and all-zeros lanes.
#if defined(__AVX512F__)
template <>
struct RegisterMask<float> {
    __mmask16 bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {static_cast<__mmask16>(a.bits | b.bits)};
    }
};
template <>
struct RegisterMask<double> {
    __mmask8 bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {static_cast<__mmask8>(a.bits | b.bits)};
    }
};
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<float> m) noexcept { return m.bits != 0; }
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<double> m) noexcept { return m.bits != 0; }
#define KDLOSS_COMPARE(suffix, predicate, sse) {KDLOSS_MM(cmp_##suffix##_mask)(a.v, b.v, predicate)}
#define KDLOSS_BLEND(suffix) KDLOSS_MM(mask_blend_##suffix)(condition.bits, if_false.v, if_true.v)
#else
template <>
struct RegisterMask<float> {
    NativeFloat bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {KDLOSS_MM(or_ps)(a.bits, b.bits)};
    }
};
template <>
struct RegisterMask<double> {
    NativeDouble bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {KDLOSS_MM(or_pd)(a.bits, b.bits)};
    }
};
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<float> m) noexcept { return KDLOSS_MM(movemask_ps)(m.bits) != 0; }
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<double> m) noexcept { return KDLOSS_MM(movemask_pd)(m.bits) != 0; }
#if defined(__AVX2__)
#define KDLOSS_COMPARE(suffix, predicate, sse) {_mm256_cmp_##suffix(a.v, b.v, predicate)}
#define KDLOSS_BLEND(suffix) _mm256_blendv_##suffix(if_false.v, if_true.v, condition.bits)
#else
// SSE2 has a function for each comparison, and no blend: and, and-not, or.
#define KDLOSS_COMPARE(suffix, predicate, sse) {_mm_##sse##_##suffix(a.v, b.v)}
#define KDLOSS_BLEND(suffix) \
    _mm_or_##suffix(_mm_and_##suffix(condition.bits, if_true.v), _mm_andnot_##suffix(condition.bits, if_false.v))
#endif
#endif

// Register<float> and Register<double>: the same operations, suffix ps or pd. Ordered comparisons, false
// where a lane is NaN, and != true there, as C++'s operators are.
#define KDLOSS_FLOATING_REGISTER(T, Native, suffix)                                                  \
    template <>                                                                                      \
    struct Register<T> {                                                                             \
        Native v;                                                                                    \
        KDLOSS_REGISTER_INLINE Register() noexcept : v(KDLOSS_MM(setzero_##suffix)()) {}             \
        KDLOSS_REGISTER_INLINE explicit Register(Native x) noexcept : v(x) {}                        \
        KDLOSS_REGISTER_INLINE explicit Register(T x) noexcept : v(KDLOSS_MM(set1_##suffix)(x)) {}   \
        static KDLOSS_REGISTER_INLINE Register load(const T* p) noexcept {                           \
            return Register(KDLOSS_MM(loadu_##suffix)(p));                                           \
        }                                                                                            \
        KDLOSS_REGISTER_INLINE void store(T* p) const noexcept { KDLOSS_MM(storeu_##suffix)(p, v); } \
        friend KDLOSS_REGISTER_INLINE Register operator+(Register a, Register b) noexcept {          \
            return Register(KDLOSS_MM(add_##suffix)(a.v, b.v));                                      \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE Register operator-(Register a, Register b) noexcept {          \
            return Register(KDLOSS_MM(sub_##suffix)(a.v, b.v));                                      \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE Register operator*(Register a, Register b) noexcept {          \
            return Register(KDLOSS_MM(mul_##suffix)(a.v, b.v));                                      \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE Register operator/(Register a, Register b) noexcept {          \
            return Register(KDLOSS_MM(div_##suffix)(a.v, b.v));                                      \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator<(Register a, Register b) noexcept {   \
            return KDLOSS_COMPARE(suffix, _CMP_LT_OQ, cmplt);                                        \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator>(Register a, Register b) noexcept {   \
            return KDLOSS_COMPARE(suffix, _CMP_GT_OQ, cmpgt);                                        \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator<=(Register a, Register b) noexcept {  \
            return KDLOSS_COMPARE(suffix, _CMP_LE_OQ, cmple);                                        \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator==(Register a, Register b) noexcept {  \
            return KDLOSS_COMPARE(suffix, _CMP_EQ_OQ, cmpeq);                                        \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator!=(Register a, Register b) noexcept {  \
            return KDLOSS_COMPARE(suffix, _CMP_NEQ_UQ, cmpneq);                                      \
        }                                                                                            \
        friend KDLOSS_REGISTER_INLINE Register blend(RegisterMask<T> condition, Register if_true,    \
                                                     Register if_false) noexcept {                   \
            return Register(KDLOSS_BLEND(suffix));                                                   \
        }                                                                                            \
    };
KDLOSS_FLOATING_REGISTER(float, NativeFloat, ps)
KDLOSS_FLOATING_REGISTER(double, NativeDouble, pd)
#undef KDLOSS_FLOATING_REGISTER
#undef KDLOSS_COMPARE
#undef KDLOSS_BLEND

// Register<std::uint32_t> and Register<std::uint64_t>: lanes of 32 or 64 bits, suffix epi32 or epi64. Shifts
// take their count in a register (an immediate is required to be a constant, which a parameter is not to
// MSVC); compilers fold a constant count into the immediate form.
#if defined(__AVX512F__)
#define KDLOSS_SET1_EPI64 _mm512_set1_epi64
// The zero-masked shifts with every lane set: the plain ones make g++ 12 warn of their own placeholder operand
// (-Wmaybe-uninitialized), as lookup's permute does in pack.hpp.
#define KDLOSS_ALL_LANES_32 __mmask16(0xffff)
#define KDLOSS_ALL_LANES_64 __mmask8(0xff)
#define KDLOSS_SHIFT(direction, bits, a, count) _mm512_maskz_##direction##_epi##bits(KDLOSS_ALL_LANES_##bits, a, count)
#else
#define KDLOSS_SET1_EPI64 KDLOSS_MM(set1_epi64x)
#define KDLOSS_SHIFT(direction, bits, a, count) KDLOSS_MM(direction##_epi##bits)(a, count)
#endif
#define KDLOSS_INTEGER_REGISTER(T, bits, set1)                                                                  \
    template <>                                                                                                 \
    struct Register<T> {                                                                                        \
        NativeInteger v;                                                                                        \
        KDLOSS_REGISTER_INLINE Register() noexcept : v(KDLOSS_SI(setzero)()) {}                                 \
        KDLOSS_REGISTER_INLINE explicit Register(NativeInteger x) noexcept : v(x) {}                            \
        KDLOSS_REGISTER_INLINE explicit Register(T x) noexcept : v(set1(static_cast<std::int##bits##_t>(x))) {} \
        static KDLOSS_REGISTER_INLINE Register load(const T* p) noexcept {                                      \
            return Register(KDLOSS_SI(loadu)(reinterpret_cast<const NativeInteger*>(p)));                       \
        }                                                                                                       \
        KDLOSS_REGISTER_INLINE void store(T* p) const noexcept {                                                \
            KDLOSS_SI(storeu)(reinterpret_cast<NativeInteger*>(p), v);                                          \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator+(Register a, Register b) noexcept {                     \
            return Register(KDLOSS_MM(add_epi##bits)(a.v, b.v));                                                \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator-(Register a, Register b) noexcept {                     \
            return Register(KDLOSS_MM(sub_epi##bits)(a.v, b.v));                                                \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator&(Register a, Register b) noexcept {                     \
            return Register(KDLOSS_AND(a.v, b.v));                                                              \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator|(Register a, Register b) noexcept {                     \
            return Register(KDLOSS_OR(a.v, b.v));                                                               \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator<<(Register a, int shift) noexcept {                     \
            return Register(KDLOSS_SHIFT(sll, bits, a.v, _mm_cvtsi32_si128(shift)));                            \
        }                                                                                                       \
        friend KDLOSS_REGISTER_INLINE Register operator>>(Register a, int shift) noexcept {                     \
            return Register(KDLOSS_SHIFT(srl, bits, a.v, _mm_cvtsi32_si128(shift)));                            \
        }                                                                                                       \
    };
KDLOSS_INTEGER_REGISTER(std::uint32_t, 32, KDLOSS_MM(set1_epi32))
KDLOSS_INTEGER_REGISTER(std::uint64_t, 64, KDLOSS_SET1_EPI64)
#undef KDLOSS_INTEGER_REGISTER
#undef KDLOSS_SET1_EPI64
#undef KDLOSS_SHIFT
#undef KDLOSS_ALL_LANES_32
#undef KDLOSS_ALL_LANES_64

// Register-wide operations whose intrinsics' names do not follow one pattern across the widths: the same bits
// as integers and back, float lanes to double lanes and back, fused multiply-adds and table lookups.
#if defined(__AVX512F__)
KDLOSS_REGISTER_INLINE __m512i integer_bits(__m512 x) noexcept { return _mm512_castps_si512(x); }
KDLOSS_REGISTER_INLINE __m512i integer_bits(__m512d x) noexcept { return _mm512_castpd_si512(x); }
KDLOSS_REGISTER_INLINE __m512 float_bits(__m512i x) noexcept { return _mm512_castsi512_ps(x); }
KDLOSS_REGISTER_INLINE __m512d double_bits(__m512i x) noexcept { return _mm512_castsi512_pd(x); }
// The first (which = 0) or second half of a register of floats, as doubles. (The zero-masked forms with every lane
// set, for g++ 12's warning as above.)
KDLOSS_REGISTER_INLINE __m512d widen_half(__m512 x, std::size_t which) noexcept {
    const __m512d bits = _mm512_castps_pd(x);
    const __m256d half =
        which == 0 ? _mm512_maskz_extractf64x4_pd(0xff, bits, 0) : _mm512_maskz_extractf64x4_pd(0xff, bits, 1);
    return _mm512_maskz_cvtps_pd(0xff, _mm256_castpd_ps(half));
}
// Two registers of doubles, rounded to float, as one register of floats (low's lanes first).
KDLOSS_REGISTER_INLINE __m512 narrow_pair(__m512d low, __m512d high) noexcept {
    const __m512d first = _mm512_castps_pd(_mm512_castps256_ps512(_mm512_maskz_cvtpd_ps(0xff, low)));
    const __m256d second = _mm256_castps_pd(_mm512_maskz_cvtpd_ps(0xff, high));
    return _mm512_castpd_ps(_mm512_mask_insertf64x4(first, 0xff, first, second, 1));
}
#elif defined(__AVX2__)
KDLOSS_REGISTER_INLINE __m256i integer_bits(__m256 x) noexcept { return _mm256_castps_si256(x); }
KDLOSS_REGISTER_INLINE __m256i integer_bits(__m256d x) noexcept { return _mm256_castpd_si256(x); }
KDLOSS_REGISTER_INLINE __m256 float_bits(__m256i x) noexcept { return _mm256_castsi256_ps(x); }
KDLOSS_REGISTER_INLINE __m256d double_bits(__m256i x) noexcept { return _mm256_castsi256_pd(x); }
KDLOSS_REGISTER_INLINE __m256d widen_half(__m256 x, std::size_t which) noexcept {
    return _mm256_cvtps_pd(which == 0 ? _mm256_castps256_ps128(x) : _mm256_extractf128_ps(x, 1));
}
KDLOSS_REGISTER_INLINE __m256 narrow_pair(__m256d low, __m256d high) noexcept {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(low)), _mm256_cvtpd_ps(high), 1);
}
#else
KDLOSS_REGISTER_INLINE __m128i integer_bits(__m128 x) noexcept { return _mm_castps_si128(x); }
KDLOSS_REGISTER_INLINE __m128i integer_bits(__m128d x) noexcept { return _mm_castpd_si128(x); }
KDLOSS_REGISTER_INLINE __m128 float_bits(__m128i x) noexcept { return _mm_castsi128_ps(x); }
KDLOSS_REGISTER_INLINE __m128d double_bits(__m128i x) noexcept { return _mm_castsi128_pd(x); }
KDLOSS_REGISTER_INLINE __m128d widen_half(__m128 x, std::size_t which) noexcept {
    return _mm_cvtps_pd(which == 0 ? x : _mm_movehl_ps(x, x));
}
KDLOSS_REGISTER_INLINE __m128 narrow_pair(__m128d low, __m128d high) noexcept {
    return _mm_movelh_ps(_mm_cvtpd_ps(low), _mm_cvtpd_ps(high));
}
#endif

KDLOSS_REGISTER_INLINE Register<std::uint32_t> bits_of(Register<float> x) noexcept {
    return Register<std::uint32_t>(integer_bits(x.v));
}
KDLOSS_REGISTER_INLINE Register<std::uint64_t> bits_of(Register<double> x) noexcept {
    return Register<std::uint64_t>(integer_bits(x.v));
}
KDLOSS_REGISTER_INLINE Register<float> from_bits_of(Register<std::uint32_t> x) noexcept {
    return Register<float>(float_bits(x.v));
}
KDLOSS_REGISTER_INLINE Register<double> from_bits_of(Register<std::uint64_t> x) noexcept {
    return Register<double>(double_bits(x.v));
}

// a * b + c, rounded once where the target fuses it (see above), else twice.
KDLOSS_REGISTER_INLINE Register<float> fused_multiply_add(Register<float> a, Register<float> b,
                                                          Register<float> c) noexcept {
#if defined(KDLOSS_REGISTER_FMA)
    return Register<float>(KDLOSS_MM(fmadd_ps)(a.v, b.v, c.v));
#else
    return a * b + c;
#endif
}
KDLOSS_REGISTER_INLINE Register<double> fused_multiply_add(Register<double> a, Register<double> b,
                                                           Register<double> c) noexcept {
#if defined(KDLOSS_REGISTER_FMA)
    return Register<double>(KDLOSS_MM(fmadd_pd)(a.v, b.v, c.v));
#else
    return a * b + c;
#endif
}

#undef KDLOSS_MM
#undef KDLOSS_SI
#undef KDLOSS_AND
#undef KDLOSS_OR

#elif defined(KDLOSS_NEON_REGISTERS)

inline constexpr std::size_t register_bytes = 16;
#define KDLOSS_REGISTER_FMA 1

template <>
struct RegisterMask<float> {
    uint32x4_t bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {vorrq_u32(a.bits, b.bits)};
    }
};
template <>
struct RegisterMask<double> {
    uint64x2_t bits;
    friend KDLOSS_REGISTER_INLINE RegisterMask operator|(RegisterMask a, RegisterMask b) noexcept {
        return {vorrq_u64(a.bits, b.bits)};
    }
};
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<float> m) noexcept { return vmaxvq_u32(m.bits) != 0; }
KDLOSS_REGISTER_INLINE bool any_lane_of(RegisterMask<double> m) noexcept {
    return vmaxvq_u32(vreinterpretq_u32_u64(m.bits)) != 0;
}

// NEON has no "not equal": the complement of "equal", by a not of 32-bit lanes (there is none of 64). Two names,
// not two overloads: MSVC's NEON types are all one type.
KDLOSS_REGISTER_INLINE uint32x4_t not_u32(uint32x4_t x) noexcept { return vmvnq_u32(x); }
KDLOSS_REGISTER_INLINE uint64x2_t not_u64(uint64x2_t x) noexcept {
    return vreinterpretq_u64_u32(vmvnq_u32(vreinterpretq_u32_u64(x)));
}
#define KDLOSS_FLOATING_REGISTER(T, Native, f, u)                                                           \
    template <>                                                                                             \
    struct Register<T> {                                                                                    \
        Native v;                                                                                           \
        KDLOSS_REGISTER_INLINE Register() noexcept : v(vdupq_n_##f(0)) {}                                   \
        KDLOSS_REGISTER_INLINE explicit Register(Native x) noexcept : v(x) {}                               \
        KDLOSS_REGISTER_INLINE explicit Register(T x) noexcept : v(vdupq_n_##f(x)) {}                       \
        static KDLOSS_REGISTER_INLINE Register load(const T* p) noexcept { return Register(vld1q_##f(p)); } \
        KDLOSS_REGISTER_INLINE void store(T* p) const noexcept { vst1q_##f(p, v); }                         \
        friend KDLOSS_REGISTER_INLINE Register operator+(Register a, Register b) noexcept {                 \
            return Register(vaddq_##f(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator-(Register a, Register b) noexcept {                 \
            return Register(vsubq_##f(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator*(Register a, Register b) noexcept {                 \
            return Register(vmulq_##f(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator/(Register a, Register b) noexcept {                 \
            return Register(vdivq_##f(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator<(Register a, Register b) noexcept {          \
            return {vcltq_##f(a.v, b.v)};                                                                   \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator>(Register a, Register b) noexcept {          \
            return {vcgtq_##f(a.v, b.v)};                                                                   \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator<=(Register a, Register b) noexcept {         \
            return {vcleq_##f(a.v, b.v)};                                                                   \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator==(Register a, Register b) noexcept {         \
            return {vceqq_##f(a.v, b.v)};                                                                   \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE RegisterMask<T> operator!=(Register a, Register b) noexcept {         \
            return {not_##u(vceqq_##f(a.v, b.v))};                                                          \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register blend(RegisterMask<T> condition, Register if_true,           \
                                                     Register if_false) noexcept {                          \
            return Register(vbslq_##f(condition.bits, if_true.v, if_false.v));                              \
        }                                                                                                   \
    };
KDLOSS_FLOATING_REGISTER(float, float32x4_t, f32, u32)
KDLOSS_FLOATING_REGISTER(double, float64x2_t, f64, u64)
#undef KDLOSS_FLOATING_REGISTER

// Shifts are by a signed count in a register, to the right where it is negative.
#define KDLOSS_INTEGER_REGISTER(T, Native, u, s)                                                            \
    template <>                                                                                             \
    struct Register<T> {                                                                                    \
        Native v;                                                                                           \
        KDLOSS_REGISTER_INLINE Register() noexcept : v(vdupq_n_##u(0)) {}                                   \
        KDLOSS_REGISTER_INLINE explicit Register(Native x) noexcept : v(x) {}                               \
        KDLOSS_REGISTER_INLINE explicit Register(T x) noexcept : v(vdupq_n_##u(x)) {}                       \
        static KDLOSS_REGISTER_INLINE Register load(const T* p) noexcept { return Register(vld1q_##u(p)); } \
        KDLOSS_REGISTER_INLINE void store(T* p) const noexcept { vst1q_##u(p, v); }                         \
        friend KDLOSS_REGISTER_INLINE Register operator+(Register a, Register b) noexcept {                 \
            return Register(vaddq_##u(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator-(Register a, Register b) noexcept {                 \
            return Register(vsubq_##u(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator&(Register a, Register b) noexcept {                 \
            return Register(vandq_##u(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator|(Register a, Register b) noexcept {                 \
            return Register(vorrq_##u(a.v, b.v));                                                           \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator<<(Register a, int shift) noexcept {                 \
            return Register(vshlq_##u(a.v, vdupq_n_##s(shift)));                                            \
        }                                                                                                   \
        friend KDLOSS_REGISTER_INLINE Register operator>>(Register a, int shift) noexcept {                 \
            return Register(vshlq_##u(a.v, vdupq_n_##s(-shift)));                                           \
        }                                                                                                   \
    };
KDLOSS_INTEGER_REGISTER(std::uint32_t, uint32x4_t, u32, s32)
KDLOSS_INTEGER_REGISTER(std::uint64_t, uint64x2_t, u64, s64)
#undef KDLOSS_INTEGER_REGISTER

KDLOSS_REGISTER_INLINE Register<std::uint32_t> bits_of(Register<float> x) noexcept {
    return Register<std::uint32_t>(vreinterpretq_u32_f32(x.v));
}
KDLOSS_REGISTER_INLINE Register<std::uint64_t> bits_of(Register<double> x) noexcept {
    return Register<std::uint64_t>(vreinterpretq_u64_f64(x.v));
}
KDLOSS_REGISTER_INLINE Register<float> from_bits_of(Register<std::uint32_t> x) noexcept {
    return Register<float>(vreinterpretq_f32_u32(x.v));
}
KDLOSS_REGISTER_INLINE Register<double> from_bits_of(Register<std::uint64_t> x) noexcept {
    return Register<double>(vreinterpretq_f64_u64(x.v));
}
KDLOSS_REGISTER_INLINE float64x2_t widen_half(float32x4_t x, std::size_t which) noexcept {
    return which == 0 ? vcvt_f64_f32(vget_low_f32(x)) : vcvt_high_f64_f32(x);
}
KDLOSS_REGISTER_INLINE float32x4_t narrow_pair(float64x2_t low, float64x2_t high) noexcept {
    return vcvt_high_f32_f64(vcvt_f32_f64(low), high);
}
KDLOSS_REGISTER_INLINE Register<float> fused_multiply_add(Register<float> a, Register<float> b,
                                                          Register<float> c) noexcept {
    return Register<float>(vfmaq_f32(c.v, a.v, b.v));
}
KDLOSS_REGISTER_INLINE Register<double> fused_multiply_add(Register<double> a, Register<double> b,
                                                           Register<double> c) noexcept {
    return Register<double>(vfmaq_f64(c.v, a.v, b.v));
}
#endif

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail

#endif
