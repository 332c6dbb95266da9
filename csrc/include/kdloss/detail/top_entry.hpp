#pragma once

// A nearly one-hot student's gradient entry at its top class k, from the row's other entries (issue 20).
//
// Where the student is all but sure of k (q_k near 1), reverse KL's entry there, q_k (r_k - E_q[r]) with E_q[r]
// near r_k (reverse_kl.hpp), is a small difference of two numbers near r_k, and keeps T's rounding of r_k. Every
// loss here depends on the student's logits through softmax(s / T) and softmax(s) alone, which a shift of s leaves
// as they are, so each row's gradient sums to 0: the entry at k is minus the sum of the others, each accurate
// relative to its own terms, summed here in double. (Float32 rows of 10 classes at T = 1 with Z_s - 1 below 1/16,
// a tenth of them, had gone to the double kernels whole, and made such a call half as long again.) The other
// entries share E_q[r]'s rounding, weighted by their mass, so the sum carries it times Z_s - 1: the soft term's
// shared_terms, which the row's GradientSize takes in with the others' magnitudes for redo_inexact_rows.

#include <cmath>
#include <cstddef>

#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// The first of student[0 .. n) that holds `largest` (one of them does).
template <class T>
std::size_t top_class(const T* student, std::size_t n, T largest) noexcept {
    const std::size_t whole = n - n % lanes;
    std::size_t c = 0;
    while (c < whole && select(Pack<T>::load(student + c) == Pack<T>(largest), Pack<T>(1), Pack<T>(0)).max() == 0)
        c += lanes;
    while (c < n && student[c] != largest) ++c;
    return c < n ? c : 0;
}

// A row's gradient[top] set to minus the sum of its other entries; `size` then describes the row as it is now: its
// largest entry, and as its terms, the others' magnitudes summed and `shared_terms` (what they share).
template <class T>
void set_top_entry(T* gradient, std::size_t n, std::size_t top, double shared_terms,
                   GradientSize<double>& size) noexcept {
    gradient[top] = T(0);
    Pack<double> sum, magnitudes;
    Pack<T> largest;
    const std::size_t whole = n - n % lanes;
    for (std::size_t i = 0; i < whole; i += lanes) {
        const Pack<T> g = Pack<T>::load(gradient + i);
        const Pack<T> entry = magnitude(g);
        sum += widen(g);
        magnitudes += widen(entry);
        largest = select(entry > largest, entry, largest);
    }
    double total = sum.sum(), total_magnitudes = magnitudes.sum(), most = static_cast<double>(largest.max());
    for (std::size_t i = whole; i < n; ++i) {
        const double entry = static_cast<double>(gradient[i]);
        total += entry;
        total_magnitudes += std::fabs(entry);
        most = std::fabs(entry) > most ? std::fabs(entry) : most;
    }
    gradient[top] = static_cast<T>(-total);
    const double top_entry = std::fabs(static_cast<double>(gradient[top]));
    size = {top_entry > most ? top_entry : most, total_magnitudes + shared_terms};
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
