#pragma once

// The hard term of a row that the exact pass computes again (exact_row.hpp, exact_kl_row.hpp), from the labels:
// CE = sum(y) log Z_h - sum_c y_c ds_c (cross_entropy.hpp), ds = s - max s, y one-hot (a class index) or a
// distribution; and what its gradient takes off at the labels.

#include <cstddef>
#include <cstdint>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/kernel_namespace.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

template <class T>
struct ExactHardTerm {
    const T* target = nullptr;  // the row's distribution, or null (class indices, or no hard term)
    std::int64_t label = -1;    // the row's class index, or -1
    double target_mass = 1.0;   // sum(y)
    double target_cross = 0.0;  // sum_c y_c ds_c

    // CE, given log Z_h.
    double loss(double log_student_hard) const noexcept { return target_mass * log_student_hard - target_cross; }
    // A gradient's entry g at class c less the hard part's y_c, times its scale.
    double less_target(double g, std::size_t c, double hard_scale) const noexcept {
        if (target != nullptr) return g - hard_scale * static_cast<double>(target[c]);
        return static_cast<std::int64_t>(c) == label ? g - hard_scale : g;
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
