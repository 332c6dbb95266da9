#pragma once

// The hard term of a row that the exact pass computes again (exact_row.hpp, exact_kl_row.hpp), from the labels:
// CE = sum(y) log Z_h - sum_c y_c ds_c (cross_entropy.hpp), ds = s - max s, y one-hot (a class index) or a
// distribution, with Z_h's maxima and rest apart as there; and its gradient, h sum(y) - y.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/pack.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class T>
struct ExactHardTerm {
    const T* target = nullptr;  // the row's distribution, or null (class indices, or no hard term)
    std::int64_t label = -1;    // the row's class index, or -1
    double target_mass = 1.0;   // sum(y)
    double target_cross = 0.0;  // sum_c y_c ds_c
    double maxima = 1.0;        // the classes at max s (set_sums)
    double rest = 0.0;          // the sum of e^(ds) over the others
    bool alone_at_top = false;  // a class index at the student's only top class (cross_entropy.hpp's at_top)

    void set_sums(double maxima_count, double rest_sum) noexcept {
        maxima = maxima_count;
        rest = rest_sum;
        alone_at_top = label >= 0 && target_cross == 0.0 && maxima == 1.0 && rest < 0.5;
    }
    double student_hard() const noexcept { return maxima + rest; }
    double loss() const noexcept { return target_mass * std::log1p((maxima - 1.0) + rest) - target_cross; }

    // The gradient's h sum(y) part, times its scale, given e^(ds) and ds; at a label alone at the top, h_y - 1,
    // -rest / Z_h, which h_y less 1 would leave double's rounding of 1.
    Pack<double> gradient(const Pack<double>& e_hard, const Pack<double>& ds, double hard_scale) const noexcept {
        const Pack<double> h = (hard_scale * target_mass / student_hard()) * e_hard;
        if (!alone_at_top) return h;
        return select(ds == Pack<double>(0.0), Pack<double>(-hard_scale * rest / student_hard()), h);
    }
    // A gradient's entry g at class c less the hard part's y_c, times its scale (but at a label alone at the top).
    double less_target(double g, std::size_t c, double hard_scale) const noexcept {
        if (target != nullptr) return g - hard_scale * static_cast<double>(target[c]);
        return static_cast<std::int64_t>(c) == label && !alone_at_top ? g - hard_scale : g;
    }
};

// Row r's labels, its student row `student` and that row's largest logit; none where there is no hard term.
template <class T>
ExactHardTerm<T> exact_hard_term(const BatchProblem<T>& problem, std::ptrdiff_t r, const T* student,
                                 double student_max) noexcept {
    ExactHardTerm<T> term;
    if (problem.hard_weight == 0.0 || problem.label_kind == LabelKind::none) return term;
    if (problem.label_kind != LabelKind::distributions) {
        term.label = problem.class_indices[r * problem.class_index_stride];
        term.target_cross = static_cast<double>(student[term.label]) - student_max;
        return term;
    }
    term.target = problem.targets + r * problem.target_stride;
    term.target_mass = 0.0;
    for (std::size_t c = 0; c < problem.classes; ++c) {
        const double y = static_cast<double>(term.target[c]);
        term.target_mass += y;
        if (y != 0.0) term.target_cross += y * (static_cast<double>(student[c]) - student_max);
    }
    return term;
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
