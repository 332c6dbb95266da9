#pragma once

// kdloss::DistillationLoss<T>: the knowledge-distillation loss of Hinton et al. (2015) over a batch,
// with the parameters, validation and semantics of the Python class kdloss.DistillationLoss.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kdloss/detail/batch_problem.hpp"
#include "kdloss/detail/thread_pool.hpp"
#include "kdloss/divergence.hpp"
#include "kdloss/isa.hpp"
#include "kdloss/messages.hpp"
#include "kdloss/sparse_teacher.hpp"
#include "kdloss/views.hpp"

namespace kdloss {

enum class Reduction { mean, sum, none };

inline Reduction parse_reduction(std::string_view name) {
    if (name == "mean") return Reduction::mean;
    if (name == "sum") return Reduction::sum;
    if (name == "none") return Reduction::none;
    throw std::invalid_argument("reduction must be one of 'mean', 'sum', 'none', got '" + std::string(name) + "'");
}

inline const char* reduction_name(Reduction reduction) noexcept {
    switch (reduction) {
        case Reduction::mean: return "mean";
        case Reduction::sum: return "sum";
        case Reduction::none: return "none";
    }
    return "mean";
}

// The most threads a call may be asked for: more would be a typo, and a pool of them would take the machine.
inline constexpr std::size_t max_threads = 4096;

// The temperatures in which the loss and gradient meet their stated accuracy (float32 1e-5 relative, float64
// 1e-12; tests/python/test_temperature_range.py checks it against mpmath): below 1e-30, e^(ds/T)'s scale leaves
// float's range; up to 1e6, where the soft loss's terms cancel to O(1/T^2) of themselves, every row is computed
// again from the distributions' relative difference (detail/exact_row.hpp). A sparse teacher's loss has no such
// pass yet: up to 100 (max_sparse_temperature), where its terms keep the accuracy themselves.
inline constexpr double min_temperature = 1e-30;
inline constexpr double max_temperature = 1e6;
inline constexpr double max_sparse_temperature = 100.0;
static_assert(max_temperature == 1e6, "Parameters::checked's message spells max_temperature");

// The smallest positive beta and skew: a mixture weight below it leaves float's normal range in the kernels'
// products (and the mixture divergence is then within rounding of its plain KL anyway).
inline constexpr double min_mixture_weight = 1e-30;

// The smallest normaliser, the smallest normal double: the reduction's scale, 1 / normaliser, stays finite.
inline constexpr double min_normalizer = std::numeric_limits<double>::min();

// The loss's hyper-parameters, one value type: DistillationLoss<T> keeps one, checked. A new parameter is a
// field here and its check in checked(), whose messages are those of the Python front ends.
struct Parameters {
    double temperature = 3.0;
    double alpha = 0.3;
    Reduction reduction = Reduction::mean;
    std::int64_t ignore_index = -100;
    std::size_t num_threads = 1;  // 1: the calling thread only; 0: every hardware thread
    Divergence divergence = Divergence::forward_kl;
    double beta = 0.5;         // jsd's mixture weight (see Divergence)
    double skew = 0.1;         // the skew divergences' weight (see Divergence)
    Tail tail = Tail::bucket;  // what a sparse teacher's tail is matched against (see SparseTeacherView)

    // These parameters with num_threads 0 made the hardware's count, or std::invalid_argument naming the first
    // that is out of range.
    Parameters checked() const {
        if (!(temperature >= min_temperature && temperature <= max_temperature))
            throw std::invalid_argument("temperature must be in [" + detail::format_number(min_temperature) +
                                        ", 1e6] (where kdloss is accurate), got " + detail::format_number(temperature));
        if (!(alpha >= 0.0 && alpha <= 1.0))
            throw std::invalid_argument("alpha must be finite and in [0, 1], got " + detail::format_number(alpha));
        if (num_threads > max_threads)
            throw std::invalid_argument("num_threads must be at most " + std::to_string(max_threads) + ", got " +
                                        std::to_string(num_threads));
        if (static_cast<std::size_t>(divergence) >= divergence_count)        // an integer cast to the enumeration
            parse_divergence(std::to_string(static_cast<int>(divergence)));  // throws, listing the names
        if (!(beta >= 0.0 && beta <= 1.0))
            throw std::invalid_argument("beta must be in [0, 1], got " + detail::format_number(beta));
        if (beta > 0.0 && beta < min_mixture_weight)
            throw std::invalid_argument("beta must be 0 or at least " + detail::format_number(min_mixture_weight) +
                                        " (where kdloss is accurate), got " + detail::format_number(beta));
        if (!(skew >= 0.0 && skew < 1.0))
            throw std::invalid_argument("skew must be in [0, 1), got " + detail::format_number(skew));
        if (skew > 0.0 && skew < min_mixture_weight)
            throw std::invalid_argument("skew must be 0 or at least " + detail::format_number(min_mixture_weight) +
                                        " (where kdloss is accurate), got " + detail::format_number(skew));
        if (tail != Tail::bucket && tail != Tail::renormalize)   // an integer cast to the enumeration
            parse_tail(std::to_string(static_cast<int>(tail)));  // throws, listing the names
        Parameters result = *this;
        if (num_threads == 0) result.num_threads = detail::ThreadPool::hardware_threads();
        return result;
    }
};

// A loss's two terms, reduced as the loss is (DistillationLoss<T>::loss_parts).
struct LossParts {
    double soft = 0.0;  // T^2 D(p, q)
    double hard = 0.0;  // the cross-entropy against the labels; 0 without labels
};

template <class T>
class DistillationLoss {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "kdloss::DistillationLoss is defined for float and double");

public:
    static constexpr std::int64_t default_ignore_index = -100;
    static constexpr std::size_t max_threads = kdloss::max_threads;

    explicit DistillationLoss(const Parameters& parameters) : params_(parameters.checked()) {}

    // num_threads: rows are split across up to this many threads of a shared pool; 1 runs on the calling
    // thread only, 0 uses every hardware thread. Results are bitwise identical whatever the count.
    explicit DistillationLoss(double temperature = 3.0, double alpha = 0.3, Reduction reduction = Reduction::mean,
                              std::int64_t ignore_index = default_ignore_index, std::size_t num_threads = 1,
                              Divergence divergence = Divergence::forward_kl, double beta = 0.5, double skew = 0.1,
                              Tail tail = Tail::bucket)
        : DistillationLoss(
              Parameters{temperature, alpha, reduction, ignore_index, num_threads, divergence, beta, skew, tail}) {}

    const Parameters& parameters() const noexcept { return params_; }
    double temperature() const noexcept { return params_.temperature; }
    double alpha() const noexcept { return params_.alpha; }
    Reduction reduction() const noexcept { return params_.reduction; }
    std::int64_t ignore_index() const noexcept { return params_.ignore_index; }
    std::size_t num_threads() const noexcept { return params_.num_threads; }
    Divergence divergence() const noexcept { return params_.divergence; }
    double beta() const noexcept { return params_.beta; }
    double skew() const noexcept { return params_.skew; }
    Tail tail() const noexcept { return params_.tail; }
    void set_temperature(double temperature) { set(&Parameters::temperature, temperature); }
    void set_alpha(double alpha) { set(&Parameters::alpha, alpha); }

    // The teacher, as logits (a MatrixView, or the arguments of one) or cached sparsely (SparseTeacherView):
    // every method takes either. With a sparse teacher the soft term is KL over the listed classes and the tail
    // (tail() says how), the divergence must be forward_kl, and every row's slots are checked first (indices
    // in [0, C), none listed twice, no NaN or +inf, probabilities summing to at most 1 + 1e-6).
    class Teacher {
    public:
        Teacher(MatrixView<const T> logits) noexcept : dense_(logits) {}
        Teacher(MatrixView<T> logits) noexcept : dense_(logits) {}
        Teacher(const T* data, std::size_t rows, std::size_t cols) noexcept : dense_(data, rows, cols) {}
        Teacher(const T* data, std::size_t rows, std::size_t cols, std::ptrdiff_t row_stride) noexcept
            : dense_(data, rows, cols, row_stride) {}
        Teacher(const SparseTeacherView& sparse) noexcept : sparse_(&sparse) {}

        const MatrixView<const T>& dense() const noexcept { return dense_; }
        const SparseTeacherView* sparse() const noexcept { return sparse_; }

    private:
        MatrixView<const T> dense_;
        const SparseTeacherView* sparse_ = nullptr;
    };

    // The reduced loss ("none": the sum of the row losses, the quantity whose gradient is returned).
    double compute_loss(MatrixView<const T> student_logits, const Teacher& teacher_logits,
                        const Labels<T>& true_labels = {}) const {
        return evaluate(student_logits, teacher_logits, true_labels, nullptr, nullptr);
    }

    // Writes the exact gradient of the reduced loss with respect to the student logits.
    void compute_gradient(MatrixView<const T> student_logits, const Teacher& teacher_logits,
                          const Labels<T>& true_labels, const MatrixView<T>& gradient) const {
        evaluate(student_logits, teacher_logits, true_labels, nullptr, &gradient);
    }

    double loss_and_gradient(MatrixView<const T> student_logits, const Teacher& teacher_logits,
                             const Labels<T>& true_labels, const MatrixView<T>& gradient) const {
        return evaluate(student_logits, teacher_logits, true_labels, nullptr, &gradient);
    }

    // The general entry point. Returns the reduced loss; writes each row's loss to row_losses[i] (ignored
    // rows: 0) and the gradient to *gradient when they are not null. Every argument is checked before
    // anything is written, so on an exception the outputs are untouched. The gradient may not share memory
    // with the inputs: the kernels write into it while they still read them.
    //
    // For gradient accumulation and sharded batches: a `normalizer` (finite, >= min_normalizer) replaces the
    // reduction's divisor (loss and gradient are the sum over rows divided by it, e.g. the number of counted rows over
    // all micro-batches and processes), and *counted_rows receives the number of rows that count (not ignored).
    double evaluate(MatrixView<const T> student_logits, const Teacher& teacher_logits, const Labels<T>& true_labels,
                    T* row_losses, const MatrixView<T>* gradient, std::optional<double> normalizer = std::nullopt,
                    std::size_t* counted_rows = nullptr) const {
        Call call = prepare(student_logits, teacher_logits, true_labels, gradient, normalizer, counted_rows);
        const std::size_t rows = call.problem.rows;
        if (rows == 0) return 0.0;
        // Left uninitialised: the kernels write every row's loss.
        const std::unique_ptr<double[]> row_loss_buffer(new double[rows]);
        call.problem.row_losses = row_loss_buffer.get();
        run(detail::rows_kernel<T>(), call.problem);
        // Row losses are added in row order, whichever threads computed them, so results are reproducible.
        double total = 0.0;
        for (std::size_t i = 0; i < rows; ++i) {
            total += row_loss_buffer[i];
            if (row_losses != nullptr) row_losses[i] = static_cast<T>(row_loss_buffer[i]);
        }
        return total / call.divisor;
    }

    // The loss's two terms apart, each reduced as the loss is: the soft term T^2 D and the hard term, the
    // cross-entropy (0 without labels), so that the loss is alpha hard + (1 - alpha) soft with labels and soft
    // without. Both are computed whatever alpha is, for one loss call's time (no gradient). Each row's terms go
    // to soft_rows[i] and hard_rows[i] when they are not null (ignored rows: 0); "none" returns their sums.
    LossParts loss_parts(MatrixView<const T> student_logits, const Teacher& teacher_logits,
                         const Labels<T>& true_labels = {}, T* soft_rows = nullptr, T* hard_rows = nullptr,
                         std::optional<double> normalizer = std::nullopt) const {
        Call call = prepare(student_logits, teacher_logits, true_labels, nullptr, normalizer, nullptr);
        const std::size_t rows = call.problem.rows;
        if (rows == 0) return {};
        call.problem.soft_weight = 1.0;  // both terms, whatever alpha is
        if (call.problem.label_kind != detail::LabelKind::none) call.problem.hard_weight = 1.0;
        const std::unique_ptr<double[]> buffer(new double[2 * rows]);
        call.problem.row_losses = buffer.get();
        call.problem.row_hard_losses = buffer.get() + rows;
        run(detail::rows_kernel<T>(), call.problem);
        LossParts parts;
        for (std::size_t i = 0; i < rows; ++i) {
            parts.soft += buffer[i];
            parts.hard += buffer[rows + i];
            if (soft_rows != nullptr) soft_rows[i] = static_cast<T>(buffer[i]);
            if (hard_rows != nullptr) hard_rows[i] = static_cast<T>(buffer[rows + i]);
        }
        parts.soft /= call.divisor;
        parts.hard /= call.divisor;
        return parts;
    }

private:
    // A checked call: what the kernels run, and what the sum over rows is divided by.
    struct Call {
        detail::BatchProblem<T> problem;
        double divisor = 1.0;
    };

    // Every check, then the problem the kernels run (its row_losses still to be given).
    Call prepare(MatrixView<const T> student_logits, const Teacher& teacher_logits, const Labels<T>& true_labels,
                 const MatrixView<T>* gradient, std::optional<double> normalizer, std::size_t* counted_rows_out) const {
        check_normalizer(normalizer);
        const SparseTeacherView* sparse = teacher_logits.sparse();
        // A sparse teacher's place among the views checked below: the student's own logits, never read as a
        // teacher's (with a hard term alone, the kernels take them for the teacher's and read none of them).
        const MatrixView<const T> teacher = sparse != nullptr ? student_logits : teacher_logits.dense();
        if (sparse != nullptr) check_sparse_shape(student_logits, *sparse);
        check_shapes(student_logits, teacher, true_labels, gradient);
        if (gradient != nullptr) check_apart(*gradient, student_logits, teacher, true_labels, sparse);
        const std::size_t rows = student_logits.rows;
        const std::size_t counted_rows = count_rows_and_check_labels(true_labels, rows, student_logits.cols);
        if (sparse != nullptr) check_sparse_slots(*sparse, student_logits.cols);
        if (counted_rows_out != nullptr) *counted_rows_out = counted_rows;
        Call call;
        // The sum over rows is divided by this (1: no division); 0 rows counted divide nothing.
        call.divisor = normalizer                                                 ? *normalizer
                       : params_.reduction == Reduction::mean && counted_rows > 0 ? static_cast<double>(counted_rows)
                                                                                  : 1.0;

        const bool labelled = true_labels.kind != Labels<T>::Kind::none;
        detail::BatchProblem<T>& problem = call.problem;
        problem.rows = rows;
        problem.classes = student_logits.cols;
        problem.student = student_logits.data;
        problem.student_stride = student_logits.row_stride;
        problem.teacher = teacher.data;
        problem.teacher_stride = teacher.row_stride;
        problem.sparse = sparse;
        problem.tail = params_.tail;
        if (true_labels.kind == Labels<T>::Kind::class_indices) {
            problem.label_kind = detail::LabelKind::class_indices;
            problem.class_indices = true_labels.indices.data;
            problem.class_index_stride = true_labels.indices.stride;
        } else if (true_labels.kind == Labels<T>::Kind::distributions) {
            problem.label_kind = detail::LabelKind::distributions;
            problem.targets = true_labels.distributions.data;
            problem.target_stride = true_labels.distributions.row_stride;
        }
        problem.ignore_index = params_.ignore_index;
        problem.divergence = params_.divergence;
        problem.beta = params_.beta;
        problem.skew = params_.skew;
        problem.temperature = params_.temperature;
        problem.soft_weight = labelled ? 1.0 - params_.alpha : 1.0;
        problem.hard_weight = labelled ? params_.alpha : 0.0;
        problem.gradient_scale = 1.0 / call.divisor;
        if (gradient != nullptr) {
            problem.gradient = gradient->data;
            problem.gradient_stride = gradient->row_stride;
        }
        return call;
    }

    // Runs the kernel over every row of `problem` (at least one), on up to num_threads threads.
    void run(detail::RowsKernel<T> kernel, const detail::BatchProblem<T>& problem) const {
        const std::size_t rows = problem.rows;
        // A thread is only worth waking for enough work: below ~65k elements a parallel call loses more to
        // the wake-up than it gains.
        const std::size_t worth_threads = std::max<std::size_t>(1, rows * problem.classes / min_elements_per_thread);
        // Tasks are runs of consecutive rows: each row's result is the same whichever task or thread
        // computes it, but within a run the kernels overlap a row with the next (fetching it, finding its
        // maxima), so one thread takes all rows as one run. Several threads share runs that are each worth a
        // wake-up, about four a thread, so that one that wakes late still finds its share; but a run's first
        // row costs a pass of its own (its maxima), so a run takes up to four rows where the threads' shares
        // allow it (benchmarks/README.md, "Kernel design decisions").
        const std::size_t threads_wanted = std::min(params_.num_threads, worth_threads);
        const std::size_t rows_per_task =
            threads_wanted == 1
                ? rows
                : std::max({std::size_t{1}, min_elements_per_task / problem.classes, rows / (4 * threads_wanted),
                            std::min(min_rows_per_task, rows / threads_wanted)});
        const std::size_t tasks = (rows + rows_per_task - 1) / rows_per_task;
        const std::size_t threads = std::min(threads_wanted, tasks);
        const std::size_t scratch_per_thread =
            detail::scratch_elements<T>(problem.classes) +
            (problem.sparse != nullptr ? detail::sparse_scratch_elements<T>(problem.sparse->k()) : 0);
        // Left uninitialised: the kernels write every element before reading it, and zeroing tens of
        // kilobytes of scratch would be a fifth of a small call.
        const std::unique_ptr<T[]> scratch(new T[threads * scratch_per_thread]);
        detail::ThreadPool::run(tasks, threads, [&](std::size_t task, std::size_t worker) {
            const std::size_t begin = task * rows_per_task;
            kernel(problem, begin, std::min(rows, begin + rows_per_task), scratch.get() + worker * scratch_per_thread);
        });
    }

    static constexpr std::size_t min_rows_per_task = 4;  // where there are rows enough (see evaluate)
    static constexpr std::size_t min_elements_per_task = 32768;
    static constexpr std::size_t min_elements_per_thread = 65536;

    // A copy with one field changed and checked, so that a rejected value leaves the object as it was.
    template <class Field>
    void set(Field Parameters::* field, Field value) {
        Parameters changed = params_;
        changed.*field = value;
        params_ = changed.checked();
    }

    void check_normalizer(std::optional<double> normalizer) const {
        if (!normalizer) return;
        if (!(std::isfinite(*normalizer) && *normalizer >= min_normalizer))
            throw std::invalid_argument("normalizer must be finite and >= " + detail::format_number(min_normalizer) +
                                        " (the smallest normal double), got " + detail::format_number(*normalizer));
        if (params_.reduction == Reduction::none)
            throw std::invalid_argument("normalizer needs reduction 'mean' or 'sum', not 'none'");
    }

    static void check_shapes(const MatrixView<const T>& student, const MatrixView<const T>& teacher,
                             const Labels<T>& labels, const MatrixView<T>* gradient) {
        if (student.cols == 0)
            throw std::invalid_argument("student_logits must have at least one class, got shape " +
                                        detail::format_shape(student.rows, student.cols));
        if (teacher.rows != student.rows || teacher.cols != student.cols)
            throw std::invalid_argument("teacher_logits must have the shape of student_logits " +
                                        detail::format_shape(student.rows, student.cols) + ", got " +
                                        detail::format_shape(teacher.rows, teacher.cols));
        if (labels.kind == Labels<T>::Kind::class_indices && labels.indices.count != student.rows)
            throw std::invalid_argument("true_labels as class indices must have shape (" +
                                        std::to_string(student.rows) + ",), got (" +
                                        std::to_string(labels.indices.count) + ",)");
        if (labels.kind == Labels<T>::Kind::distributions &&
            (labels.distributions.rows != student.rows || labels.distributions.cols != student.cols))
            throw std::invalid_argument("true_labels as target distributions must have the shape of student_logits " +
                                        detail::format_shape(student.rows, student.cols) + ", got " +
                                        detail::format_shape(labels.distributions.rows, labels.distributions.cols));
        if (gradient != nullptr && (gradient->rows != student.rows || gradient->cols != student.cols))
            throw std::invalid_argument("out must have the shape of student_logits " +
                                        detail::format_shape(student.rows, student.cols) + ", got " +
                                        detail::format_shape(gradient->rows, gradient->cols));
    }

    // The addresses a view's elements span, [begin, end) (empty for no elements).
    struct AddressRange {
        std::uintptr_t begin = 0, end = 0;
    };
    template <class U>
    static AddressRange address_range(const U* data, std::size_t rows, std::size_t cols, std::ptrdiff_t stride) {
        if (data == nullptr || rows == 0 || cols == 0) return {};
        const std::ptrdiff_t last_row = static_cast<std::ptrdiff_t>(rows - 1) * stride;  // a stride may be < 0
        return {reinterpret_cast<std::uintptr_t>(data + std::min<std::ptrdiff_t>(0, last_row)),
                reinterpret_cast<std::uintptr_t>(data + std::max<std::ptrdiff_t>(0, last_row) + cols)};
    }
    template <class U>
    static AddressRange address_range(const MatrixView<U>& view) {
        return address_range(view.data, view.rows, view.cols, view.row_stride);
    }
    static bool overlap(AddressRange a, AddressRange b) {
        return a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end;
    }

    static void check_apart(const MatrixView<T>& gradient, const MatrixView<const T>& student,
                            const MatrixView<const T>& teacher, const Labels<T>& labels,
                            const SparseTeacherView* sparse) {
        const AddressRange out = address_range(gradient);
        if (sparse != nullptr) {
            const auto bytes = [&](const void* data, std::size_t size, std::ptrdiff_t stride) {
                return address_range(static_cast<const unsigned char*>(data), sparse->rows(), sparse->k() * size,
                                     stride * static_cast<std::ptrdiff_t>(size));
            };
            const AddressRange out_bytes =
                address_range(reinterpret_cast<const unsigned char*>(gradient.data), gradient.rows,
                              gradient.cols * sizeof(T), gradient.row_stride * static_cast<std::ptrdiff_t>(sizeof(T)));
            if (overlap(out_bytes, bytes(sparse->indices_data(), sparse->index_bytes(), sparse->index_row_stride())) ||
                overlap(out_bytes,
                        bytes(sparse->logprobs_data(), sparse->logprob_bytes(), sparse->logprob_row_stride())))
                throw std::invalid_argument("out must not share memory with the inputs");
        }
        const AddressRange label_range =
            labels.kind == Labels<T>::Kind::class_indices
                ? address_range(labels.indices.data, labels.indices.count, 1, labels.indices.stride)
                : address_range(labels.distributions);
        if (overlap(out, address_range(student)) || overlap(out, address_range(teacher)) || overlap(out, label_range))
            throw std::invalid_argument("out must not share memory with the inputs");
    }

    void check_sparse_shape(const MatrixView<const T>& student, const SparseTeacherView& sparse) const {
        if (params_.divergence != Divergence::forward_kl)
            throw std::invalid_argument(std::string("divergence '") + divergence_name(params_.divergence) +
                                        "' needs the teacher's whole distribution: a sparse teacher takes "
                                        "divergence 'forward_kl' only");
        if (params_.temperature > max_sparse_temperature)
            throw std::invalid_argument("temperature must be at most " + detail::format_number(max_sparse_temperature) +
                                        " with a sparse teacher (where kdloss is accurate), got " +
                                        detail::format_number(params_.temperature));
        if (sparse.rows() != student.rows)
            throw std::invalid_argument("a sparse teacher must have a row for each row of student_logits (" +
                                        std::to_string(student.rows) + "), got " + std::to_string(sparse.rows()));
        if (sparse.k() == 0) throw std::invalid_argument("a sparse teacher must have at least one slot a row, got 0");
    }

    // Every row's slots, in row order, each checked in the order of the messages (the Python SparseTeacher's
    // validate() says the same). Empty slots (-inf) are not looked at. A row's probabilities may sum to 1e-6 above 1,
    // and half-precision log-probabilities, each rounded by up to 2^-11 of itself (p by up to p |log p| 2^-11), to
    // that much more.
    static void check_sparse_slots(const SparseTeacherView& sparse, std::size_t classes) {
        std::vector<unsigned char> seen(classes, 0);
        const bool half = sparse.logprob_type() == SparseTeacherView::LogProbType::float16;
        for (std::size_t row = 0; row < sparse.rows(); ++row) {
            double total = 0.0, rounding = 0.0;
            for (std::size_t k = 0; k < sparse.k(); ++k) {
                const double logprob = sparse.logprob(row, k);
                if (std::isnan(logprob))
                    throw std::invalid_argument("logprobs of row " + sparse.row_name(row) + " hold NaN");
                if (logprob == std::numeric_limits<double>::infinity())
                    throw std::invalid_argument("logprobs of row " + sparse.row_name(row) + " hold +inf");
            }
            for (std::size_t k = 0; k < sparse.k(); ++k) {
                if (sparse.logprob(row, k) == -std::numeric_limits<double>::infinity()) continue;
                const std::int64_t index = sparse.index(row, k);
                if (index < 0 || static_cast<std::uint64_t>(index) >= classes)
                    throw std::invalid_argument("indices of row " + sparse.row_name(row) + " hold " +
                                                std::to_string(index) + ", outside [0, " + std::to_string(classes) +
                                                ")");
            }
            std::int64_t repeated = -1;  // the smallest class listed twice
            for (std::size_t k = 0; k < sparse.k(); ++k) {
                const double logprob = sparse.logprob(row, k);
                if (logprob == -std::numeric_limits<double>::infinity()) continue;
                const std::int64_t index = sparse.index(row, k);
                if (seen[static_cast<std::size_t>(index)] && (repeated < 0 || index < repeated)) repeated = index;
                seen[static_cast<std::size_t>(index)] = 1;
                const double p = std::exp(logprob);
                total += p;
                if (half && p > 0.0) rounding += p * std::fabs(logprob);
            }
            for (std::size_t k = 0; k < sparse.k(); ++k)
                if (sparse.logprob(row, k) != -std::numeric_limits<double>::infinity())
                    seen[static_cast<std::size_t>(sparse.index(row, k))] = 0;
            if (repeated >= 0)
                throw std::invalid_argument("indices of row " + sparse.row_name(row) + " list class " +
                                            std::to_string(repeated) + " more than once");
            const double tolerance = 1e-6 + 0x1p-11 * rounding;
            if (total > 1.0 + tolerance)
                throw std::invalid_argument("logprobs of row " + sparse.row_name(row) + " sum to probability " +
                                            detail::format_number(total) + " > 1 (+" +
                                            (rounding == 0.0 ? std::string("1e-6") : detail::format_number(tolerance)) +
                                            " for rounding)");
        }
    }

    // Checks every label before any output is written; returns the number of rows that count in "mean".
    std::size_t count_rows_and_check_labels(const Labels<T>& labels, std::size_t rows, std::size_t classes) const {
        if (labels.kind == Labels<T>::Kind::class_indices) {
            std::size_t counted = 0;
            for (std::size_t i = 0; i < rows; ++i) {
                const std::int64_t label = labels.indices[i];
                if (label == params_.ignore_index) continue;
                if (label < 0 || static_cast<std::uint64_t>(label) >= classes)
                    throw std::invalid_argument("true_labels[" + std::to_string(i) + "] = " + std::to_string(label) +
                                                " is not a class index in [0, " + std::to_string(classes) +
                                                ") nor ignore_index (" + std::to_string(params_.ignore_index) + ")");
                ++counted;
            }
            return counted;
        }
        if (labels.kind == Labels<T>::Kind::distributions) {
            for (std::size_t i = 0; i < rows; ++i) {
                const T* y = labels.distributions.row(i);
                for (std::size_t c = 0; c < classes; ++c) {
                    if (!(y[c] >= T(0) && y[c] <= std::numeric_limits<T>::max()))
                        throw std::invalid_argument("true_labels[" + std::to_string(i) + ", " + std::to_string(c) +
                                                    "] = " + detail::format_number(static_cast<double>(y[c])) +
                                                    ": target distributions must be finite and >= 0");
                }
            }
        }
        return rows;
    }

    Parameters params_;
};

}  // namespace kdloss
