#pragma once

// Rows whose divergence the kernels' form would lose to cancellation, computed again from the relative
// difference of the two distributions (issue 20).
//
// The kernels compute KL as a difference of two terms (forward_kl.hpp: a cross term and log Z_s - log Z_t),
// each as large as the logits' spread over T, and the gradient as q - p. Where the student is close to the
// teacher, or T is large, the divergence is far smaller than those terms and than q, and both lose to
// cancellation what T's precision is of the terms: float32's result was wrong in its second digit for a student
// within 1e-3 of the teacher, and in its sign at T = 1e5. Such rows are recognised from their sums
// (redo_inexact_rows: the kernels' own result, small against the terms it is a difference of, against the rounding
// of the exponentials, or small outright) and computed again here, in double, from
//   x_c = log(p_c / q_c) = d_c - L,  d_c = ((t_c - s_c) - (max t - max s)) / T,  L = log sum_c q_c e^(d_c),
// where t_c - s_c is formed before anything else (exact for float logits, and where t and s are close), and
// u_c = p_c / q_c - 1 = expm1(x_c):
//   forward KL(p || q) = sum_c q_c phi(u_c),  phi(u) = (1 + u) log1p(u) - u,  d(T^2 KL)/ds_c = -T q_c u_c,
//   reverse KL(q || p) = sum_c q_c psi(u_c),  psi(u) = u - log1p(u),          d(T^2 KL)/ds_c = -T q_c (x_c + KL),
// (using sum_c q_c u_c = 0) with every term non-negative, phi and psi by their series near 0 (u^2/2 there), so
// that nothing cancels. An error e in L moves the sum by about e times itself. L comes from
// log1p(sum_c q_c expm1(d_c)), exact relative to L however small. Where p_c is far from q_c (|x_c| > 1), the
// terms are taken in the log domain instead, p x - (p - q) and (p - q) - q x with p = e^(log q + x), where
// nothing cancels either: no exponential of a large d overflows, and no u_c = e^x - 1 rounds to -1.
// Reverse KL's gradient is centred on the student's top class k: x_c + KL = (x_c - x_k) - sum_j q_j (x_j - x_k),
// where x_c - x_k = d_c - d_k leaves L out, and the top class's own term is 0. Where the student is nearly one-hot
// (q_k near 1, rows that saturate at a low T), x_k + KL is a difference of two numbers near x_k; this way it is
// the small sum over the other classes, which keeps its relative precision.
//
// The mixtures' terms alike, from u (exact_mixture_row.hpp). Both on Packs of doubles, with the kernels' exp2, log1p
// and fast_expm1: in a float64 call where the student has all but caught up with the teacher every row comes here,
// and scalar libm made such a call 85 times an ordinary one for the KLs, 20-24 times for the mixtures. The hard term
// is computed again too, since the gradient's row is written whole.

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/exact_hard_term.hpp"
#include "kdloss/detail/exact_kl_row.hpp"
#include "kdloss/detail/exact_mixture_row.hpp"
#include "kdloss/detail/forward_kl.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/mixture.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/reverse_kl.hpp"
#include "kdloss/detail/terms.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

// Rows rows[0 .. count) of a float problem computed again by the double kernels, in `widened`
// (widened_elements(classes) doubles' worth of floats): run_rows.hpp, which defines it next to the kernels' table
// it calls into.
template <class T>
void widened_rows(const BatchProblem<T>& problem, const std::size_t* rows, std::size_t count, T* widened) noexcept;

// Float rows that redo_inexact_rows sends to widened_rows, gathered until they make a group (widened_group): a
// block of short rows costs the double kernels as much for one row as for sixteen, and where a row in fifty needs it
// (short rows whose gradient is small against its terms at T = 1), one at a time cost such a call half its time
// again. With each row, the loss to
// put back once it is done (rows computed again for their gradient alone keep the kernels' loss). For a double
// problem, nothing: its rows go to exact_row one by one.
template <class T>
class WidenedRows {
public:
    WidenedRows(T* scratch, std::size_t classes) noexcept : scratch_(scratch), group_(widened_group(classes)) {}

    void add(const BatchProblem<T>& problem, std::size_t row, bool keep_loss) noexcept {
        rows_[count_] = row;
        keep_loss_[count_] = keep_loss;
        if (keep_loss) {
            kept_loss_[count_] = problem.row_losses[row];
            if (problem.row_hard_losses != nullptr) kept_hard_loss_[count_] = problem.row_hard_losses[row];
        }
        if (++count_ == group_) flush(problem);
    }

    // Computes the rows added since the last flush: each caller of redo_inexact_rows flushes before it returns.
    void flush(const BatchProblem<T>& problem) noexcept {
        if (count_ == 0) return;
        if constexpr (std::is_same_v<T, float>) widened_rows(problem, rows_, count_, scratch_);
        for (std::size_t k = 0; k < count_; ++k) {
            if (!keep_loss_[k]) continue;
            problem.row_losses[rows_[k]] = kept_loss_[k];
            if (problem.row_hard_losses != nullptr) problem.row_hard_losses[rows_[k]] = kept_hard_loss_[k];
        }
        count_ = 0;
    }

private:
    T* scratch_;  // widened_elements(classes) doubles' worth of T, after the kernels' scratch
    std::size_t group_, count_ = 0;
    std::size_t rows_[lanes] = {};
    bool keep_loss_[lanes] = {};
    double kept_loss_[lanes] = {}, kept_hard_loss_[lanes] = {};
};

// The highest temperature at which the kernels' results are kept where redo_inexact_rows finds them accurate: above
// it their terms are of order 1/T and D of 1/T^2, and the tests of their accuracy reach T = 100
// (test_temperature_range.py), so every row is computed here.
inline constexpr double kernels_max_temperature = 100.0;

// Row `row` of `problem` (a dense teacher, not ignored), its soft term `kind` (a KL, or the mixture
// problem.divergence): writes its loss (or its two parts) and, if the problem has one, its gradient row, over
// what the kernels wrote.
template <class T>
void exact_row(const BatchProblem<T>& problem, std::size_t row, ExactKind kind) noexcept {
    if (kind == ExactKind::forward_kl) exact_kl_row<true>(problem, row);
    else if (kind == ExactKind::reverse_kl) exact_kl_row<false>(problem, row);
    else exact_mixture_row(problem, row);
}

// Once rows[0 .. count)'s losses and gradient rows are written (a block's, or RowLosses' rows), given their
// divergences as the kernels computed them: those whose results cancellation or rounding may have spoilt, computed
// again: a float row by the double kernels
// (widened_rows, in `widened`), which judge it by float's tolerance and send it on here if they must; a double row
// by exact_row. The kernels' error in D, measured
// against a high-precision truth over rows from near matches to independent logits (issue 20), has two parts:
// - some ulps of T's precision times the size of the terms D is the difference of (its soft term's terms_size): a
//   row is computed again where D is below its redo_fraction of that size;
// - a floor from the rounding of each exponential, about an ulp times sqrt(sum p^2) <= sqrt(max p) of the
//   distribution D's sums are weighted by (one over the soft term's inverse_largest_probability), whatever the terms'
//   size: a row is computed again where D is below 4 ulps times that over the tolerance, D^2 / max p < rounding_floor^2
//   (a D of 0 is the small D's below, where 1 / max p is infinite and their product NaN). (Float32 rows
//   with D from 1e-3 to 1e-2 and few classes missed the tolerance by up to 4x before this part.)
// and rows with D below redo_below_divergence (terms.hpp: float 1e-3, double 1e-6) are computed again whatever else.
// These keep the loss within 0.6 of the tolerances the library promises (float 1e-5, double 1e-12) on every kept row
// measured. The gradient (with one; gradient_size, null for the loss alone): each soft entry is a difference of terms
// (q and p, or q G and q E_q[G]), rounded relative to them, and the hard term's added to it, so a row is computed again
// where its largest entry is below 4 ulps over the tolerance of the largest such terms (GradientSize, found by the
// gradient pass; where the two terms all but balance, as training makes them, their sum cancels too). D does not say
// so: where the student rules out (or all but) a class that the teacher gives mass, D is about that mass, and every
// other entry a small difference of two numbers near a constant; the kernels' gradient missed by up to 1e3 times
// float's tolerance there, and 170 times double's. Such a row keeps the kernels' loss, which is accurate, so that the
// loss alone stays that of loss_and_gradient, bit for bit. Ordinary rows (T of 1 to 4, student and teacher apart) are
// far from all of these, and pay for two maxima in the gradient pass and a comparison per block of rows. (A nearly
// one-hot student's entry at its top class is taken from the others' before this, top_entry.hpp, and its
// GradientSize with it.) Above kernels_max_temperature every row is computed again. A soft term names the formula
// (its `exact_kind`).
// redo_inexact_rows' rows, once found: a row is computed again where loss_flags[lane] != 0 (its loss, and its
// gradient row) or gradient_flags[lane] != 0 (its gradient row alone, its loss kept). Out of line: most blocks of rows
// have none.
template <class Soft, class T, class S>
KDLOSS_NOINLINE void redo_rows(const BatchProblem<T>& problem, const Pack<double>& loss_flags,
                               const Pack<S>& gradient_flags, const std::size_t* rows, std::size_t count,
                               WidenedRows<T>& widened) noexcept {
    double loss_flag[lanes], flag[lanes];
    S gradient_flag[lanes];
    loss_flags.store(loss_flag);
    gradient_flags.store(gradient_flag);
    for (std::size_t lane = 0; lane < lanes; ++lane) flag[lane] = loss_flag[lane] + gradient_flag[lane];
    if constexpr (std::is_same_v<T, float>) {
        // Float rows first in double, by the kernels (widened_rows): about 2.5 times a float row where the exact
        // pass takes about 20, and good to float's tolerance but for the near matches that the double kernels
        // send on to the exact pass themselves.
        for (std::size_t lane = 0; lane < count; ++lane)
            if (flag[lane] != 0.0) widened.add(problem, rows[lane], loss_flag[lane] == 0.0);
        return;
    }
    for (std::size_t lane = 0; lane < count; ++lane) {
        if (flag[lane] == 0.0) continue;
        const double kept_loss = problem.row_losses[rows[lane]];
        const double kept_hard_loss = problem.row_hard_losses != nullptr ? problem.row_hard_losses[rows[lane]] : 0.0;
        exact_row(problem, rows[lane], Soft::exact_kind);
        if (loss_flag[lane] != 0.0) continue;
        problem.row_losses[rows[lane]] = kept_loss;
        if (problem.row_hard_losses != nullptr) problem.row_hard_losses[rows[lane]] = kept_hard_loss;
    }
}

template <class Terms, class T, class S>
KDLOSS_INLINE void redo_inexact_rows(const BatchProblem<T>& problem,
                                     const typename Terms::template Sums<Pack<double>>& sums,
                                     const Pack<double>& divergence, const std::size_t* rows, std::size_t count,
                                     WidenedRows<T>& widened, const GradientSize<Pack<S>>* gradient_size) noexcept {
    if constexpr (Terms::exact_rows) {
        using Soft = typename Terms::SoftTerm;
        constexpr bool single = std::is_same_v<T, float>;
        if (problem.temperature > kernels_max_temperature) {
            for (std::size_t lane = 0; lane < count; ++lane) exact_row(problem, rows[lane], Soft::exact_kind);
            return;
        }
        // Each threshold is a number of ulps of T over the tolerance: a double problem that recomputes a float row
        // (float_tolerance) needs 1e-12 / 1e-5 as many.
        const double scale = problem.float_tolerance ? 1e-7 : 1.0;
        const double relative = scale * Soft::template redo_fraction<T>, small = scale * redo_below_divergence<T>;
        const double rounding_floor = scale * (single ? 4 * 0x1p-24 / 1e-5 : 4 * 0x1p-53 / 1e-12);
        // NaN and +inf divergences compare false: such rows keep what the kernels made of them.
        const Pack<double> size = relative * Soft::terms_size_numerator(sums.soft, problem.temperature);
        const Pack<double> scaled = divergence * Soft::terms_size_denominator(sums.soft, problem.temperature);
        Mask<double> inexact = (scaled < size) | (divergence < Pack<double>(small));
        inexact = inexact | (divergence * divergence * Soft::inverse_largest_probability(sums.soft) <
                             Pack<double>(rounding_floor * rounding_floor));
        const Pack<double> loss_flags = select(inexact, Pack<double>(1.0), Pack<double>(0.0));
        // The gradient: a row whose largest entry is within 4 ulps over the tolerance of the terms its entries are
        // differences and sums of (GradientSize), compared in the gradient's own type S (a float block's two Packs
        // widened to double were a quarter of this check's time). Its loss is kept: it is accurate, and the loss alone
        // is then that of loss_and_gradient, bit for bit.
        Pack<S> gradient_flags;
        bool gradient_inexact = false;
        if constexpr (Terms::gradient) {
            gradient_flags = select(gradient_size->largest < static_cast<S>(rounding_floor) * gradient_size->terms,
                                    Pack<S>(1), Pack<S>(0));
            gradient_inexact = gradient_flags.sum() != 0;
        }
        if (loss_flags.sum() != 0.0 || gradient_inexact)
            redo_rows<Soft>(problem, loss_flags, gradient_flags, rows, count, widened);
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
