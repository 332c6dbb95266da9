#pragma once

// sample_teacher's random numbers: a counter-based generator, so that a row's draws depend only on the seed
// and the row's index, never on which thread computes it or in which order.
//
// SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014): the n-th
// output of the generator seeded with s is mix(s + n gamma), for gamma the odd 64-bit integer nearest
// 2^64 / phi and mix a bijection of 64-bit words (David Stafford's variant 13 of MurmurHash3's finaliser).
// Every output is a function of its counter, so any draw is computed directly. A row's generator is seeded
// with the row-th output of the one seeded with mix(seed): the rows' seeds are then as unrelated as
// SplitMix64's consecutive outputs (it passes BigCrush). Two rows' streams share draws only when their seeds
// differ by fewer than num_samples multiples of gamma: about 2 num_samples / 2^64 for a pair of rows.

#include <cstdint>

#include "kdloss/detail/kernel_namespace.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

constexpr std::uint64_t splitmix_gamma = 0x9e3779b97f4a7c15u;

constexpr std::uint64_t splitmix_mix(std::uint64_t z) noexcept {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

// The draws of one row.
class RowGenerator {
public:
    constexpr RowGenerator(std::uint64_t seed, std::uint64_t row) noexcept
        : seed_(splitmix_mix(splitmix_mix(seed) + (row + 1) * splitmix_gamma)) {}

    // The draw-th 64-bit output.
    constexpr std::uint64_t bits(std::uint64_t draw) const noexcept {
        return splitmix_mix(seed_ + (draw + 1) * splitmix_gamma);
    }

    // The draw-th uniform number in [0, 1): its top 53 bits, every multiple of 2^-53 equally likely.
    constexpr double uniform(std::uint64_t draw) const noexcept {
        return static_cast<double>(bits(draw) >> 11) * 0x1.0p-53;
    }

private:
    std::uint64_t seed_;
};

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
