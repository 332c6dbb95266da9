#pragma once

// Forward KL against a sparse teacher (SparseTeacherView): a policy of terms.hpp for the student's side, and a
// driver of its own for the rows. For a row with listed classes K, their probabilities p_k, the student's
// q = softmax(s/T) over all C classes, and Q_u = sum of q over the classes not listed:
//   bucket:       D = sum_k p_k (log p_k - log q_k) + r (log r - log Q_u),  r = max(0, 1 - sum_k p_k),
//   renormalize:  D = sum_k p~_k (log p~_k - log q_k),                      p~ = p / sum_k p_k,
// the KL over the K + 1 bins (the listed classes and the rest), and over the listed classes alone. With
// pi the listed probabilities (p or p~), rho the tail (r or 0) and P = sum pi + rho, the gradient of T^2 D is
//   T (P q_j - pi_j) at a listed class,   T q_j (P - rho / Q_u) elsewhere.
// The dense passes (lane_math.hpp) take the student's maxima and exponentials, and write the second formula
// everywhere; the K listed classes, a few dozen of tens of thousands, are then computed in double one by one,
// as is D (listed_classes), or, where a student near its teacher would lose D to cancellation, from each bin's
// relative difference u = pi / q - 1 (relative_divergence; in float64 from double-double sums). Q_u is summed
// over the unlisted classes themselves, never as 1 - sum_k q_k, which would lose all of it where the listed
// classes hold nearly all of the student's mass.
//
// A row's slots have been checked (DistillationLoss): indices in [0, C), none listed twice, no NaN or +inf,
// probabilities summing to at most 1 + 1e-6. Every row is run on its own (no blocks of short rows: sparse
// teachers are for vocabularies of tens of thousands), one shorter than a Pack padded to one with -inf.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/double_double.hpp"
#include "kdloss/detail/exact_kl_row.hpp"
#include "kdloss/detail/kernel_namespace.hpp"
#include "kdloss/detail/lane_math.hpp"
#include "kdloss/detail/pack.hpp"
#include "kdloss/detail/row_kernel.hpp"
#include "kdloss/detail/simd_math.hpp"
#include "kdloss/detail/terms.hpp"
#include "kdloss/sparse_teacher.hpp"

namespace kdloss::detail {
inline namespace KDLOSS_KERNEL_NAMESPACE {

struct SparseKL {
    static constexpr bool second_pass = false;
    static constexpr bool exact_rows = false;
    static constexpr bool dense_teacher = false;
    static constexpr bool top_from_others = false;

    template <class V>
    struct Sums {
        V student_soft;  // Z_s, from the exponential pass
        V divergence;    // D, from the listed classes (listed_classes)
        V unlisted;      // P / Z_s - rho / Z_u (Z_u = Q_u Z_s): the gradient at an unlisted class over T e^(ds/T)

        static Sums neutral() noexcept { return {1.0, 0.0, 0.0}; }
    };

    template <class F, class... S>
    static KDLOSS_INLINE void for_each_sum(F&& f, S&&... sums) noexcept {
        f(sums.student_soft...);
        f(sums.divergence...);
        f(sums.unlisted...);
    }

    template <class T>
    struct Partials {
        Pack<T> student_soft;

        template <class Skipped>
        KDLOSS_INLINE Pack<T> add(std::size_t i, const Pack<T>& ds, const Pack<T>&, const Pack<T>&,
                                  const LogitDifference<T>&, Exp2Scale<T> soft, const Skipped& skipped,
                                  const RowBuffers<T>& row) noexcept {
            const Pack<T> e_student = fast_exp2(ds, soft);
            e_student.store(row.student_soft + i);
            student_soft += summed(e_student, T(0), skipped);
            return e_student;
        }

        KDLOSS_INLINE void flush_into(Sums<Pack<double>>& totals) noexcept {
            totals.student_soft += widen(student_soft);
            student_soft = Pack<T>();
        }
    };

    template <class T, class V>
    static KDLOSS_INLINE V divergence(const Sums<V>& sums, double) noexcept {
        return sums.divergence;
    }

    // The gradient's soft term at an unlisted class: weight T e^(ds/T) (P / Z_s - rho / Z_u). Its factor may be
    // beyond float's range where Z_u is tiny (every unlisted class then has e^(ds/T) <= Z_u, and the product is
    // at most T rho): it is applied as two, the second a power of 2.
    template <class T>
    struct Coefficients {
        Pack<T> scale, power_of_two;

        template <class V>
        static Coefficients from_sums(const Sums<V>& sums, double weight, double temperature) noexcept {
            const double factor = weight * temperature * sums.unlisted;
            const double split = std::fabs(factor) > 0x1p100 ? 0x1p64 : 1.0;
            return {Pack<T>(static_cast<T>(factor / split)), Pack<T>(static_cast<T>(split))};
        }

        KDLOSS_INLINE Pack<T> gradient(std::size_t, const Pack<T>& e_student, const RowBuffers<T>&) const noexcept {
            return (scale * e_student) * power_of_two;
        }
    };
};

// A row's sum of n >= lanes elements, in double.
template <class T>
double row_sum(const T* values, std::size_t n) noexcept {
    Pack<double> total{};
    const std::size_t whole = n - n % lanes;
    for (std::size_t i = 0; i < whole; i += lanes) total += widen(Pack<T>::load(values + i));
    double sum = total.sum();
    for (std::size_t i = whole; i < n; ++i) sum += static_cast<double>(values[i]);
    return sum;
}

// A listed class of the row at hand, as listed_classes works it out once for the loss and the gradient.
struct ListedClass {
    std::size_t index;
    double log_p, pi;  // the teacher's log-probability as cached, and pi (p, or p / sum p)
    double log_q;      // the student's log-probability
    double excess;     // u = pi / q - 1, where the row's D is taken relative (relative_divergence)
    DoubleDouble p;    // e^(log p) in double-double, where it is taken relative (teacher_shares)
};

static_assert(sizeof(ListedClass) == listed_class_bytes, "sparse_scratch_elements (batch_problem.hpp) sizes them");

// A row's listed classes, reduced: how many, P = sum pi + rho, and rho.
struct ListedSummary {
    std::size_t count;
    double total, tail;
    bool relative;        // D and the gradient from each bin's u = pi / q - 1 (RelativeBins)
    double total_excess;  // P - 1, where relative
};

// The sum of e^(ds/T) over a row's classes in [begin, end), in double from the logits (ds = s - max), with the
// terms at the maximum (exactly 1) counted apart: log Z_s = log1p((at_max - 1) + below_max) keeps the precision of
// a saturated row's Z_s - 1, which may be 1e-17 (log Z_s would round it away).
struct ExponentialSum {
    double at_max, below_max;

    double total() const noexcept { return at_max + below_max; }
    double log() const noexcept { return std::log1p((at_max - 1.0) + below_max); }
};
template <class T>
ExponentialSum exponential_sum(const T* student, std::size_t begin, std::size_t end, double row_max,
                               double temperature) noexcept {
    const Exp2Scale<double> scale = soft_exponent<double>(temperature);
    Pack<double> at_max{}, below_max{};
    std::size_t i = begin;
    for (; i + lanes <= end; i += lanes) {
        const Pack<double> ds = widen(Pack<T>::load(student + i)) - row_max;
        const Mask<double> top = ds == Pack<double>(0.0);
        at_max += select(top, 1.0, 0.0);
        below_max += select(top, 0.0, fast_exp2(ds, scale));
    }
    ExponentialSum sum{at_max.sum(), below_max.sum()};
    for (; i < end; ++i) {
        const double ds = static_cast<double>(student[i]) - row_max;
        (ds == 0.0 ? sum.at_max : sum.below_max) += ds == 0.0 ? 1.0 : std::exp(ds / temperature);
    }
    return sum;
}

// Z_s and Z_u of a float32 row again, in double from its logits, for listed_classes: the kernels' Z_s, a sum of
// float exponentials, is good to a few 2^-24 of itself, and D moves by up to as much, absolutely (D = ... +
// P log Z_s; measured 1.7e-7 at D = 3e-3, C = 1000, 40x D for a teacher 1e-4 per logit from the student). Z_u is
// Z_s less the listed classes' exponentials, to some 2^-53 Z_s / Z_u of itself, which moves D by about rho times
// that, against D's 1e-5 (rows whose tail is near the student's own, Z_u / Z_s ~ rho, are the ones worked out
// again); below 2^-20 Z_s it is summed over the unlisted classes themselves, between the listed ones (sorted for
// it). log Z_s into log_z_student, from its terms at the maximum and below (ExponentialSum).
template <class T>
void student_sums_in_double(const T* student, T row_max, std::size_t n, double temperature, ListedClass* classes,
                            std::size_t count, bool with_tail, double& z_student, double& log_z_student,
                            double& z_unlisted) noexcept {
    const double max = static_cast<double>(row_max);
    const ExponentialSum all = exponential_sum(student, 0, n, max, temperature);
    z_student = all.total();
    log_z_student = all.log();
    if (!with_tail) return;
    double z_listed = 0.0;
    for (std::size_t j = 0; j < count; ++j)
        z_listed += std::exp((static_cast<double>(student[classes[j].index]) - max) / temperature);
    z_unlisted = z_student - z_listed;
    if (z_unlisted >= 0x1p-20 * z_student) return;
    std::sort(classes, classes + count, [](const ListedClass& a, const ListedClass& b) { return a.index < b.index; });
    z_unlisted = 0.0;
    std::size_t begin = 0;
    for (std::size_t j = 0; j < count; ++j) {
        z_unlisted += exponential_sum(student, begin, classes[j].index, max, temperature).total();
        begin = classes[j].index + 1;
    }
    z_unlisted += exponential_sum(student, begin, n, max, temperature).total();
}

// A row taken relative (relative_divergence): its bins are the listed classes and, where the row has a tail, the
// unlisted classes together (pi = rho, q = Q_u = Z_u / Z_s); each listed class's u = pi / q - 1 is in its
// `excess` and log q in its `log_q`, and:
struct RelativeBins {
    double tail;            // rho, > 0 where the row has a tail
    double tail_excess;     // the tail's u = rho / Q_u - 1 (where it has one)
    double unlisted_share;  // Q_u (0 where every class is listed)
    double total_excess;    // P - 1: 0 but where the listed probabilities sum to 1 or more
};

// The teacher's side of a row taken relative, from the listed probabilities summed in double-double: rho = 1 - sum
// pi, P - 1 and, for a renormalised row, sum p. Their rounded sum (listed_classes') decides whether a row has a
// tail and how large, to 2^-53: where one class holds nearly all the teacher's mass, the true rho may be 1e-20,
// and the row's loss as small. Each p as listed_classes took it (within an ulp: `error` bounds rho's and P - 1's
// error, absolutely), or where the listed mass is within 2^-20 of 1, or `precise`, by precise_exponential (2^-100;
// some 300 operations a class, which in rows of a thousand classes cost more than the rest), kept in its class.
struct TeacherShares {
    double tail, total_excess;
    DoubleDouble listed_sum;
    double error;
};
inline TeacherShares teacher_shares(ListedClass* classes, std::size_t count, bool renormalize, bool every_class_listed,
                                    bool precise) noexcept {
    DoubleDouble sum{0.0, 0.0};
    if (!precise) {
        for (std::size_t j = 0; j < count; ++j) sum = sum + classes[j].p;
        precise = std::fabs((DoubleDouble{1.0, 0.0} - sum).value()) < 0x1p-20;
    }
    if (precise) {
        sum = {0.0, 0.0};
        for (std::size_t j = 0; j < count; ++j) sum = sum + (classes[j].p = precise_exponential(classes[j].log_p));
    }
    const double error = (precise ? 0x1p-100 : 0x1p-52) * sum.hi;
    if (renormalize) return {0.0, count == 0 ? -1.0 : 0.0, sum, error};
    const DoubleDouble rest = DoubleDouble{1.0, 0.0} - sum;
    if (every_class_listed || rest.hi <= 0.0) return {0.0, -rest.value(), sum, error};
    return {rest.value(), 0.0, sum, error};
}

// D = sum_b q_b phi(u_b) + (P - 1) + Q_u [no tail's bin],  phi(u) = (1 + u) log1p(u) - u >= 0
// (with sum_b q_b = 1 and sum_b pi_b = P; Q_u is then the listed classes' shortfall, as for renormalised rows),
// phi by its series near 0 (kl_term) and, where |x| = |log(pi / q)| > 1, in the log domain, pi x - (pi - q).
// Nothing cancels: an error e in the normaliser Z_s moves D by about e^2 / 2, one in a bin's q by u_b times it.
inline double relative_divergence(const ListedClass* classes, ListedSummary summary, RelativeBins bins) noexcept {
    using V = Pack<double>;
    const Exp2Scale<double> natural = exp2_scale<double>(log2e);
    const bool tail_bin = bins.tail > 0.0;
    const std::size_t count = summary.count, bin_count = count + (tail_bin ? 1 : 0);
    V terms(0.0);
    for (std::size_t first = 0; first < bin_count; first += lanes) {
        double excess[lanes], log_q[lanes], pi[lanes];
        for (std::size_t i = 0; i < lanes; ++i) {
            const std::size_t j = first + i;
            const bool listed = j < count;
            excess[i] = listed ? classes[j].excess : j == count ? bins.tail_excess : 0.0;
            log_q[i] = listed                   ? classes[j].log_q
                       : j == count && tail_bin ? std::log(bins.unlisted_share)
                                                : -std::numeric_limits<double>::infinity();  // no bin: a term of 0
            pi[i] = listed ? classes[j].pi : j == count ? bins.tail : 0.0;
        }
        const V u = V::load(excess), q = fast_exp2(V::load(log_q), natural), p = V::load(pi);
        const V x = fast_log1p(u);
        const Mask<double> far = from_bits(to_bits(x) & (~std::uint64_t{0} >> 1)) > V(1.0);
        // (pi = 0, u = -1: x = -inf, and the far term is q; so is phi(-1) q.)
        terms += select(far, select(p == V(0.0), q, p * x - (p - q)), q * kl_term<true>(u));
    }
    return terms.sum() + bins.total_excess + (tail_bin ? 0.0 : bins.unlisted_share);
}

// The bins of a float32 row from Z_s and Z_u in double (student_sums_in_double, and log q from them): good to
// float32's tolerance, which asks no more of the normalisers than double. x = log pi + log Z_s - ds / T with ds /
// T's rounding kept (ds = s - max is exact for float logits), so that x keeps its relative precision where pi and
// q are close; u = expm1(x), the tail's u = (rho Z_s - Z_u) / Z_u.
template <class T>
RelativeBins bins_from_double_sums(const T* student, T row_max, double temperature, ListedClass* classes,
                                   ListedSummary summary, const TeacherShares& teacher, bool renormalize,
                                   bool every_class_listed, double z_student, double log_z_student,
                                   double z_unlisted) noexcept {
    // log pi = log p - log sum p for a renormalised row, the latter as log1p of sum p - 1 in double-double.
    const double log_p_sum = renormalize ? std::log1p((teacher.listed_sum - DoubleDouble{1.0, 0.0}).value()) : 0.0;
    const double log_normaliser = log_z_student - log_p_sum, max = static_cast<double>(row_max);
    for (std::size_t j = 0; j < summary.count; ++j) {
        const double ds = static_cast<double>(student[classes[j].index]) - max;
        const double scaled = ds / temperature, scaled_error = std::fma(-scaled, temperature, ds) / temperature;
        const DoubleDouble log_pi_z = two_sum(classes[j].log_p, log_normaliser);  // log pi + log Z_s
        classes[j].excess = std::expm1((log_pi_z.hi - scaled) + (log_pi_z.lo - scaled_error));
    }
    return {teacher.tail, teacher.tail > 0.0 ? std::fma(teacher.tail, z_student, -z_unlisted) / z_unlisted : 0.0,
            every_class_listed ? 0.0 : z_unlisted / z_student, teacher.total_excess};
}

// The bins of a float64 row, whose tolerance does ask more (double_double.hpp has why): every exponential, the
// teacher's probabilities and the sums in double-double, and per class u = (pi Z_s - e S) / (e S), e = e^(ds/T), S
// = sum pi for a renormalised row (else 1); the tail's u = (rho Z_s - Z_u) / Z_u, rho = 1 - sum pi. Sorts the
// classes by index (Z_u's sum passes over them), sets each one's log q, and z_student to Z_s. (A listed class's
// exponentials are taken twice, before and after Z_s is known: k a row, against the row's n.)
template <class T>
RelativeBins bins_in_double_double(const T* student, T row_max, std::size_t n, double temperature, ListedClass* classes,
                                   ListedSummary summary, const TeacherShares& teacher, bool renormalize,
                                   bool every_class_listed, double& z_student) noexcept {
    const ExactExponential exponential(temperature);
    const double max = static_cast<double>(row_max);
    auto exponential_of = [&](std::size_t c) {
        const double s = static_cast<double>(student[c]);
        if (s == -std::numeric_limits<double>::infinity()) return DoubleDouble{0.0, 0.0};
        const DoubleDouble ds = two_sum(s, -max);
        return exponential(ds.hi, ds.lo);
    };
    const std::size_t count = summary.count;
    std::sort(classes, classes + count, [](const ListedClass& a, const ListedClass& b) { return a.index < b.index; });
    // Z_u, a Pack of logits at a time, the listed classes' set to -inf.
    ExactExponential::Sum unlisted{};
    for (std::size_t c = 0, j = 0; c < n; c += lanes) {
        double logits[lanes];
        for (std::size_t i = 0; i < lanes; ++i)
            logits[i] = c + i < n ? static_cast<double>(student[c + i]) : -std::numeric_limits<double>::infinity();
        for (; j < count && classes[j].index < c + lanes; ++j)
            logits[classes[j].index - c] = -std::numeric_limits<double>::infinity();
        exponential.add(Pack<double>::load(logits), max, unlisted);
    }
    const DoubleDouble z_unlisted = unlisted.value();
    DoubleDouble z = z_unlisted;
    for (std::size_t j = 0; j < count; ++j) z = z + exponential_of(classes[j].index);
    z_student = z.value();
    const DoubleDouble scale = renormalize ? teacher.listed_sum : DoubleDouble{1.0, 0.0};
    for (std::size_t j = 0; j < count; ++j) {
        const DoubleDouble e = exponential_of(classes[j].index), denominator = e * scale;
        classes[j].log_q = std::log(e.value() / z_student);
        // (e = 0: the student rules the class out, and pi = 0 in a row taken relative; -1 makes its term 0.)
        classes[j].excess = e.hi == 0.0 ? -1.0 : quotient(classes[j].p * z - denominator, denominator);
    }
    const double tail_excess =
        teacher.tail > 0.0 ? quotient((DoubleDouble{1.0, 0.0} - teacher.listed_sum) * z - z_unlisted, z_unlisted) : 0.0;
    return {teacher.tail, tail_excess, every_class_listed ? 0.0 : z_unlisted.value() / z_student, teacher.total_excess};
}

// What the listed classes give a row: D into sums.divergence, the unlisted classes' gradient factor into
// sums.unlisted, each listed class into `listed` (for write_listed). `student` is the row's logits, `row_max`
// their maximum, `exponentials` their e^(ds/T). D is taken as the difference of the bins' log-probabilities,
// unless that could leave it with less than its tolerance, judged from the row's own sums (a student near the
// teacher): then by relative_divergence, a float32 row from Z_s and Z_u summed in double from the logits
// (student_sums_in_double), and sums.student_soft becomes that Z_s.
template <class T>
ListedSummary listed_classes(const BatchProblem<T>& problem, std::size_t row, const T* student, T row_max,
                             T* exponentials, std::size_t n, ListedClass* listed,
                             SparseKL::Sums<double>& sums) noexcept {
    const SparseTeacherView& teacher = *problem.sparse;
    std::size_t count = 0;
    double p_sum = 0.0, listed_exponentials = 0.0;
    for (std::size_t k = 0; k < teacher.k(); ++k) {
        const double logprob = teacher.logprob(row, k);
        if (logprob == -std::numeric_limits<double>::infinity()) continue;  // an empty slot
        const auto c = static_cast<std::size_t>(teacher.index(row, k));
        const double p = std::exp(logprob);
        ::new (static_cast<void*>(listed + count)) ListedClass{c, logprob, p, 0.0, 0.0, {p, 0.0}};
        ++count;
        p_sum += p;
        listed_exponentials += static_cast<double>(exponentials[c]);
    }
    ListedClass* const classes = std::launder(listed);
    const bool renormalize = problem.tail == Tail::renormalize;
    const double log_p_sum = renormalize && count > 0 ? std::log(p_sum) : 0.0;  // log pi = log p - log_p_sum
    if (renormalize)
        for (std::size_t j = 0; j < count; ++j) classes[j].pi /= p_sum;
    const bool every_class_listed = count == problem.classes;
    // The tail: none where every class is listed (whatever rounding left of 1), nor for a renormalised row.
    const double tail = renormalize || every_class_listed ? 0.0 : std::max(0.0, 1.0 - p_sum);
    const double total = renormalize ? (count == 0 ? 0.0 : 1.0) : tail > 0.0 ? 1.0 : p_sum;
    double z_student = sums.student_soft, z_unlisted = 0.0;
    // Z_u, the unlisted classes' sum of e^(ds/T): Z_s less the listed ones' where that keeps at least half of it (so
    // Z_s's rounding stays within twice its own relative size), else summed over the unlisted classes themselves,
    // the listed ones set to 0 (write_listed writes their gradient). Wanted for the tail, and for a row taken
    // relative.
    bool unlisted_by_difference = false;
    auto sum_unlisted = [&] {
        z_unlisted = z_student - listed_exponentials;
        unlisted_by_difference = z_unlisted >= 0.5 * z_student;
        if (!unlisted_by_difference) {
            for (std::size_t j = 0; j < count; ++j) exponentials[classes[j].index] = T(0);
            z_unlisted = row_sum(exponentials, n);
        }
    };
    if (tail > 0.0) sum_unlisted();
    // D and rho / Z_u from the two sums, each listed class's log q on the way, and the sum of the magnitudes of
    // what D is the difference of (log_terms), whose rounding D carries.
    double divergence = 0.0, unlisted_part = 0.0, log_terms = 0.0;
    auto evaluate = [&] {
        const double log_z_student = std::log(z_student);
        divergence = 0.0, log_terms = 0.0;
        for (std::size_t j = 0; j < count; ++j) {
            const double ds = static_cast<double>(student[classes[j].index]) - static_cast<double>(row_max);
            classes[j].log_q = ds / problem.temperature - log_z_student;
            if (classes[j].pi > 0.0) {
                const double log_pi = classes[j].log_p - log_p_sum;
                divergence += classes[j].pi * (log_pi - classes[j].log_q);
                log_terms += classes[j].pi * (std::fabs(log_pi) + 2 * std::fabs(classes[j].log_q));
            }
        }
        unlisted_part = 0.0;
        if (tail > 0.0) {
            const double log_z_unlisted = std::log(z_unlisted);
            divergence += tail * (std::log(tail) - (log_z_unlisted - log_z_student));
            log_terms += tail * (std::fabs(std::log(tail)) + std::fabs(log_z_unlisted) + 2 * std::fabs(log_z_student));
            unlisted_part = tail / z_unlisted;
        }
    };
    evaluate();
    // D = ... + P log Z_s - rho log Z_u moves by P e_s - rho e_u for relative errors e_s of Z_s, e_u of Z_u. A
    // sum of exponentials is good to some 4 ulps of itself; Z_u = Z_s - L takes Z_s's error whole (and L's, an
    // ulp of it), which then mostly cancels where rho is near Q_u = Z_u / Z_s, as it is in long rows whose tail
    // holds most of both sides' mass; summed apart, it has its own. Besides, D carries the rounding of the terms it
    // is the difference of. The row is taken relative where that leaves D outside a quarter of its tolerance.
    constexpr double unit = std::is_same_v<T, float> ? 0x1p-24 : 0x1p-53;
    constexpr double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-12;
    const double sums_error = 4 * unit *
                              (unlisted_by_difference ? std::fabs(total - tail * z_student / z_unlisted) +
                                                            tail * listed_exponentials / z_unlisted
                                                      : total + tail);
    const double error = sums_error + 0x1p-53 * log_terms;
    ListedSummary summary{count, total, tail, divergence < error / (0.25 * tolerance), 0.0};  // not NaN, +inf
    if (summary.relative) {
        TeacherShares teacher = teacher_shares(classes, count, renormalize, every_class_listed, false);
        RelativeBins bins;
        if constexpr (std::is_same_v<T, float>) {
            double log_z_student;
            student_sums_in_double(student, row_max, n, problem.temperature, classes, count, !every_class_listed,
                                   z_student, log_z_student, z_unlisted);
            evaluate();  // each class's log q from the new Z_s
            bins = bins_from_double_sums(student, row_max, problem.temperature, classes, summary, teacher, renormalize,
                                         every_class_listed, z_student, log_z_student, z_unlisted);
        } else {
            // First as a float32 row, from the kernels' sums: their log Z_s is good to some 8 ulps of max(1, |log
            // Z_s|), and Z_u to 4 of Z_s, an error e common to every u that moves the gradient by about e q (q up
            // to 1 / Z_s) and D by e times sum_b q_b |u_b| (and Q_u). Where that could leave either outside a
            // quarter of float64's tolerance (a student within ~1e-2 of the teacher, or saturated), in
            // double-double, which costs some 10 ns a class.
            if (tail == 0.0 && !every_class_listed) sum_unlisted();
            bins = bins_from_double_sums(student, row_max, problem.temperature, classes, summary, teacher, renormalize,
                                         every_class_listed, z_student, std::log(z_student), z_unlisted);
            const double common = 0x1p-53 * (8 * std::max(1.0, std::fabs(std::log(z_student))) +
                                             (every_class_listed ? 0.0 : 4 * z_student / z_unlisted));
            double largest = 0.0, spread = bins.unlisted_share * std::fabs(bins.tail_excess) +
                                           (bins.tail > 0.0 ? 0.0 : bins.unlisted_share);
            for (std::size_t j = 0; j < count; ++j) {
                const double q = std::exp(classes[j].log_q);
                largest = std::max(largest, q * std::fabs(bins.total_excess - classes[j].excess));
                spread += q * std::fabs(classes[j].excess);
            }
            summary.total_excess = bins.total_excess;
            const double relative = relative_divergence(classes, summary, bins);
            // (The teacher's rho and P - 1: an error e there moves D by up to (1 + |log(rho / Q_u)|) e, and the
            // unlisted classes' gradient by up to T e.)
            const double teacher_error = teacher.error * (1.0 + std::fabs(std::log1p(bins.tail_excess)));
            if (!(common / z_student + teacher.error <= 0.25 * 1e-12 * largest &&
                  common * spread + teacher_error <= 0.25 * 1e-12 * relative)) {
                teacher = teacher_shares(classes, count, renormalize, every_class_listed, true);
                bins = bins_in_double_double(student, row_max, n, problem.temperature, classes, summary, teacher,
                                             renormalize, every_class_listed, z_student);
            }
        }
        sums.student_soft = z_student;
        summary.total_excess = bins.total_excess;
        divergence = relative_divergence(classes, summary, bins);
        sums.unlisted = (bins.total_excess - (bins.tail > 0.0 ? bins.tail_excess : -1.0)) / z_student;
    } else {
        sums.unlisted = total / z_student - unlisted_part;
    }
    sums.divergence = divergence;
    return summary;
}

// The gradient at the listed classes of a row whose other classes write_gradient has written, before the
// label's term is subtracted: soft_scale T (P q_j - pi_j) and the hard term's h_scale e^(ds_j) - y_scale y_j,
// in double; at a class index `label` that is the student's only top class, its h - 1 (cross_entropy.hpp's at_top).
template <class T, class Terms>
void write_listed(const BatchProblem<T>& problem, const T* student, T row_max, const T* target, std::int64_t label,
                  const typename Terms::template Sums<double>& sums, const ListedClass* listed, ListedSummary summary,
                  T* gradient) noexcept {
    const double soft_scale = problem.gradient_scale * problem.soft_weight * problem.temperature;
    double hard_scale = 0.0, target_scale = 0.0;
    bool label_alone_at_top = false;
    if constexpr (Terms::hard) {
        target_scale = hard_gradient_scale(problem);
        hard_scale = target_scale * sums.hard.target_mass / Terms::HardTerm::student_hard(sums.hard);
        if constexpr (Terms::class_index) label_alone_at_top = Terms::HardTerm::alone_at_top(sums.hard);
    }
    for (std::size_t j = 0; j < summary.count; ++j) {
        const std::size_t c = listed[j].index;
        // P q - pi, or q ((P - 1) - u) where the row was taken relative: no cancellation where pi is near q.
        const double q = std::exp(listed[j].log_q);
        double g = soft_scale * (summary.relative ? q * (summary.total_excess - listed[j].excess)
                                                  : summary.total * q - listed[j].pi);
        if constexpr (Terms::hard) {
            if (label_alone_at_top && static_cast<std::int64_t>(c) == label)
                g -= target_scale * sums.hard.rest / Terms::HardTerm::student_hard(sums.hard);
            else g += hard_scale * std::exp(static_cast<double>(student[c]) - static_cast<double>(row_max));
            if constexpr (Terms::distribution) g -= target_scale * static_cast<double>(target[c]);
        }
        gradient[c] = static_cast<T>(g);
    }
}

// A float32 row taken relative whose unlisted classes' gradient factor is large (at a low temperature, a tail
// spread over student probabilities of 1e-38 and below): the kernels' float exponentials are flushed to 0 below
// float's smallest normal number, which loses the soft term there, up to 2^-126 times that factor. Where that could
// exceed a quarter of the tolerance of the listed classes' largest entry, such classes' soft term is added in double
// (before write_listed, which writes the listed classes over whatever this leaves there).
template <class T>
void restore_flushed_unlisted(const BatchProblem<T>& problem, const T* student, T row_max, Exp2Scale<T> soft,
                              double factor, const ListedClass* listed, ListedSummary summary, T* gradient) noexcept {
    if constexpr (std::is_same_v<T, float>) {
        double largest_listed = 0.0;  // over T
        for (std::size_t j = 0; j < summary.count; ++j)
            largest_listed = std::max(largest_listed,
                                      std::fabs(std::exp(listed[j].log_q) * (summary.total_excess - listed[j].excess)));
        const double soft_scale = problem.gradient_scale * problem.soft_weight * problem.temperature;
        if (std::fabs(factor) * 0x1p-126 <= 0.25 * 1e-5 * soft_scale * largest_listed) return;
        for (std::size_t c = 0; c < problem.classes; ++c) {
            const T ds = student[c] - row_max;
            if (ds < soft.lowest_x && student[c] != -std::numeric_limits<T>::infinity())
                gradient[c] += static_cast<T>(factor * std::exp(static_cast<double>(ds) / problem.temperature));
        }
    }
}

// Rows [begin, end) of a problem with a sparse teacher and a soft term: distill_row's passes (row_kernel.hpp)
// over the student alone, the next row's maxima found on the way, and the listed classes between them.
template <class T, class Terms>
void run_sparse_rows_with(const BatchProblem<T>& problem, std::size_t begin, std::size_t end, T* scratch) noexcept {
    static_assert(Terms::soft && !Terms::dense_teacher);
    const Exp2Scale<T> soft = soft_exponent<T>(problem.temperature);
    const std::size_t classes = problem.classes;
    auto* const listed = reinterpret_cast<ListedClass*>(scratch);
    scratch += sparse_scratch_elements<T>(problem.sparse->k());
    // A row shorter than a Pack runs padded to one: its logits with -inf, its targets with 0.
    const bool padded = classes < lanes;
    const std::size_t n = padded ? lanes : classes;
    T* padded_student = scratch;
    T* padded_target = scratch + n;
    T* padded_gradient = scratch + 2 * n;
    T* buffers = padded ? scratch + 3 * n : scratch;
    const bool fetch_ahead = !padded && classes * sizeof(T) <= long_row_bytes;
    auto logits = [&](std::size_t i) -> RowLogits<T> {
        return {problem.student + static_cast<std::ptrdiff_t>(i) * problem.student_stride, nullptr};
    };
    RowMaxima<T> maxima;
    for (std::size_t i = begin; i < end; ++i) {
        if (is_ignored(problem, i)) {
            zero_ignored_row<T, Terms>(problem, i);
            continue;
        }
        const auto row_offset = static_cast<std::ptrdiff_t>(i);
        const T* student = problem.student + row_offset * problem.student_stride;
        const T* target = Terms::distribution ? problem.targets + row_offset * problem.target_stride : nullptr;
        T* gradient = Terms::gradient ? problem.gradient + row_offset * problem.gradient_stride : nullptr;
        if (padded) {
            std::fill(padded_student, padded_student + n, -std::numeric_limits<T>::infinity());
            std::copy(student, student + classes, padded_student);
            student = padded_student;
            if constexpr (Terms::distribution) {
                std::fill(padded_target, padded_target + n, T(0));
                std::copy(target, target + classes, padded_target);
                target = padded_target;
            }
        }
        RowsAhead<T> ahead;
        if (!padded && i + 1 < end) ahead.next = logits(i + 1);
        const std::size_t fetched = scan_in_exponentials ? i + 2 : i + 1;
        if (fetched < end && fetch_ahead) ahead.fetched = logits(fetched);
        T* row_gradient = Terms::gradient ? (padded ? padded_gradient : gradient) : nullptr;
        // The student's exponentials in the gradient's row, as distill_row keeps them.
        T* student_soft = Terms::gradient ? row_gradient : buffers;
        const RowBuffers<T> row{student_soft, nullptr, buffers + n, target, hard_power(true, problem.temperature)};

        const LaneMaxima<T> lane_max =
            maxima.row.student == student ? maxima.lanes : lane_maxima<T, false>(student, nullptr, n);
        const T row_max = lane_max.student.max();
        typename Terms::template Sums<Pack<double>> lane_sums;
        const LaneMaxima<T> scanned = exponentials<T, typename Terms::without_gradient>(
            student, nullptr, Pack<T>(row_max), Pack<T>(), soft, row, n, ahead, lane_sums);
        maxima.row = {};
        if constexpr (scan_in_exponentials) maxima = {scanned, ahead.next};
        typename Terms::template Sums<double> sums;
        for_each_sum<Terms>([](double& sum, const Pack<double>& lane_sum) { sum = lane_sum.sum(); }, sums, lane_sums);
        std::int64_t class_index = 0;
        if constexpr (Terms::class_index) {
            class_index = problem.class_indices[row_offset * problem.class_index_stride];
            Terms::HardTerm::at_label(sums.hard,
                                      static_cast<double>(student[class_index]) - static_cast<double>(row_max));
            // (Before listed_classes, which sets the listed classes' exponentials to 0.)
            if constexpr (std::is_same_v<T, double>) Terms::HardTerm::count_maxima_apart(sums.hard, row, n);
        }
        const ListedSummary summary = listed_classes(problem, i, student, row_max, student_soft, n, listed, sums.soft);

        const double divergence = soft_divergence<T, Terms>(sums, problem.temperature);
        if (problem.row_hard_losses == nullptr) {
            problem.row_losses[i] =
                loss_from_sums<Terms>(sums, divergence, problem.temperature, problem.soft_weight, problem.hard_weight);
        } else {
            loss_parts_from_sums<Terms>(sums, divergence, problem.temperature, problem.row_losses[i],
                                        problem.row_hard_losses[i]);
        }
        if constexpr (Terms::gradient) {
            const auto coefficients = GradientCoefficients<T, Terms>::from_sums(sums, problem);
            const LaneMaxima<T> found = write_gradient<T, Terms>(row_gradient, row, coefficients, n,
                                                                 scan_in_exponentials ? RowLogits<T>{} : ahead.next);
            if constexpr (!scan_in_exponentials) maxima = {found, ahead.next};
            if (summary.relative)
                restore_flushed_unlisted(
                    problem, student, row_max, soft,
                    problem.gradient_scale * problem.soft_weight * problem.temperature * sums.soft.unlisted,
                    std::launder(listed), summary, row_gradient);
            write_listed<T, Terms>(problem, student, row_max, target, class_index, sums, std::launder(listed), summary,
                                   row_gradient);
            if constexpr (Terms::class_index) row_gradient[class_index] -= coefficients.hard.label_scale[0];
            if (padded) std::copy(row_gradient, row_gradient + classes, gradient);
        }
    }
}

}  // namespace KDLOSS_KERNEL_NAMESPACE
}  // namespace kdloss::detail
