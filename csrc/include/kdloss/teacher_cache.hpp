#pragma once

// kdloss::top_k and kdloss::sample_teacher: sparse teacher caches built from a batch of teacher logits, with
// the semantics and messages of the Python functions of the same names. Each row of logits becomes `slots`
// (class index, log-probability at the temperature) pairs, written into the caller's buffers:
//   top_k:          the k largest logits (ties to the lower index), sorted by decreasing logit, with their
//                   exact log-softmax over the whole row, so that the tail's mass 1 - sum p is known;
//   sample_teacher: num_samples draws with replacement from softmax(t / T), each class drawn listed once with
//                   log(count / num_samples), by decreasing count (ties to the lower index), in
//                   min(num_samples, C) slots. Reproducible: a row's draws depend on the seed and the row's
//                   index alone, whatever the thread count.
// A slot with log-probability -inf is empty: top_k lists -inf logits (masked classes) only when a row has
// fewer than k finite ones, and sample_teacher's unused slots repeat the index listed last.
//
// Indices are int32: a vocabulary has far fewer than 2^31 classes, and a cache stores one index per slot,
// which int64 would double.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kdloss/detail/cache_problem.hpp"
#include "kdloss/detail/sample_rows.hpp"
#include "kdloss/detail/thread_pool.hpp"
#include "kdloss/detail/top_k_rows.hpp"
#include "kdloss/distillation_loss.hpp"
#include "kdloss/messages.hpp"
#include "kdloss/views.hpp"

namespace kdloss {

// The most classes a cache's int32 indices can name.
inline constexpr std::size_t max_cache_classes = static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max());

// The slots of a sampled cache's rows: each draw lists at most one more class, and there are C classes.
constexpr std::size_t sample_slots(std::size_t num_samples, std::size_t classes) noexcept {
    return num_samples < classes ? num_samples : classes;
}

namespace detail {

// T as written, but not deduced from it: the builders deduce T from the log-probabilities alone, so that the
// logits may be given as a MatrixView<T> or a braced {pointer, rows, cols}.
template <class T>
struct NotDeduced {
    using type = T;
};

// The addresses a view's elements span, [begin, end) (empty for no elements).
struct CacheSpan {
    std::uintptr_t begin = 0, end = 0;

    template <class U>
    explicit CacheSpan(const MatrixView<U>& view) noexcept {
        if (view.data == nullptr || view.rows == 0 || view.cols == 0) return;
        const std::ptrdiff_t last_row = static_cast<std::ptrdiff_t>(view.rows - 1) * view.row_stride;
        begin = reinterpret_cast<std::uintptr_t>(view.data + std::min<std::ptrdiff_t>(0, last_row));
        end = reinterpret_cast<std::uintptr_t>(view.data + std::max<std::ptrdiff_t>(0, last_row) +
                                               static_cast<std::ptrdiff_t>(view.cols));
    }

    bool overlaps(const CacheSpan& other) const noexcept {
        return begin < end && other.begin < other.end && begin < other.end && other.begin < end;
    }
};

// Every argument check but k's or num_samples', then the call as the kernels see it. `slots` is the number of
// columns the outputs must have.
template <class T>
CacheProblem<T> cache_problem(MatrixView<const T> logits, std::size_t slots, double temperature,
                              const MatrixView<std::int32_t>& indices, const MatrixView<T>& logprobs) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "kdloss's teacher caches are defined for float and double logits");
    Parameters temperature_only;  // the loss's check and message, the other parameters at their defaults
    temperature_only.temperature = temperature;
    temperature_only.checked();
    const std::string expected = format_shape(logits.rows, slots);
    if (indices.rows != logits.rows || indices.cols != slots)
        throw std::invalid_argument("indices must have shape " + expected + ", got " +
                                    format_shape(indices.rows, indices.cols));
    if (logprobs.rows != logits.rows || logprobs.cols != slots)
        throw std::invalid_argument("logprobs must have shape " + expected + ", got " +
                                    format_shape(logprobs.rows, logprobs.cols));
    const CacheSpan read(logits), indices_span(indices), logprobs_span(logprobs);
    if (indices_span.overlaps(read) || logprobs_span.overlaps(read) || indices_span.overlaps(logprobs_span))
        throw std::invalid_argument("indices and logprobs must not share memory with teacher_logits or each other");

    CacheProblem<T> problem;
    problem.rows = logits.rows;
    problem.classes = logits.cols;
    problem.logits = logits.data;
    problem.logit_stride = logits.row_stride;
    problem.temperature = temperature;
    problem.slots = slots;
    problem.indices = indices.data;
    problem.index_stride = indices.row_stride;
    problem.logprobs = logprobs.data;
    problem.logprob_stride = logprobs.row_stride;
    return problem;
}

inline void check_cache_classes(std::size_t rows, std::size_t classes) {
    if (classes == 0)
        throw std::invalid_argument("teacher_logits must have at least one class, got shape " +
                                    format_shape(rows, classes));
    if (classes > max_cache_classes)
        throw std::invalid_argument("teacher_logits must have at most " + std::to_string(max_cache_classes) +
                                    " classes (int32 indices), got " + std::to_string(classes));
}

// How messages name a row (format_row): (i,) for row i, or, for a host whose rows are the flattened leading axes
// of an N-D array (shape not null), the row's index in their shape, e.g. (3, 17), and () for a 1-D array's row.
struct LeadingShape {
    const std::size_t* shape = nullptr;
    std::size_t ndim = 0;

    std::string row_name(std::size_t row) const {
        return shape == nullptr ? format_row(row) : format_row(row, shape, ndim);
    }
};

// What is wrong with a row a kernel stopped at: its first NaN or +inf, or that it holds nothing but -inf.
template <class T>
std::string bad_row_message(MatrixView<const T> logits, std::size_t row, LeadingShape leading) {
    const std::string name = leading.row_name(row);
    const T* x = logits.row(row);
    for (std::size_t c = 0; c < logits.cols; ++c)
        if (!(x[c] < std::numeric_limits<T>::infinity()))
            return "teacher_logits must be finite or -inf, got " + format_number(static_cast<double>(x[c])) +
                   " at class " + std::to_string(c) + " of row " + name;
    return "teacher_logits must have a finite logit in every row (its softmax needs one), got only -inf in row " + name;
}

// Per-thread scratch, in elements.
struct CacheScratchSizes {
    std::size_t group_maxima = 0, candidates = 0, exponentials = 0, cumulative = 0, draws = 0, drawn = 0;
};

// Runs the kernel over every row on up to num_threads threads (0: every hardware thread), then throws for the
// first row that has no softmax, if any.
template <class T>
void run_cache(CacheKernel<T> kernel, const CacheProblem<T>& problem, std::size_t num_threads,
               std::size_t elements_per_row, const CacheScratchSizes& sizes, LeadingShape leading) {
    Parameters threads_only;  // the loss's check and message, and its meaning of 0
    threads_only.num_threads = num_threads;
    num_threads = threads_only.checked().num_threads;
    const std::size_t rows = problem.rows;
    if (rows == 0) return;
    // As the loss splits rows (DistillationLoss<T>::run): a thread is worth waking for about 65k elements, and
    // a thread's rows come in about four runs, so that one that wakes late still finds its share. Rows are
    // independent, so a row's result does not depend on the run it is in.
    constexpr std::size_t min_elements_per_thread = 65536, min_elements_per_task = 32768;
    const std::size_t worth_threads = std::max<std::size_t>(1, rows * elements_per_row / min_elements_per_thread);
    const std::size_t threads_wanted = std::min(num_threads, worth_threads);
    const std::size_t rows_per_task =
        threads_wanted == 1
            ? rows
            : std::max({std::size_t{1}, min_elements_per_task / elements_per_row, rows / (4 * threads_wanted)});
    const std::size_t tasks = (rows + rows_per_task - 1) / rows_per_task;
    const std::size_t threads = std::min(threads_wanted, tasks);

    // Left uninitialised: the kernels write every element before reading it.
    const std::unique_ptr<T[]> group_maxima(new T[threads * sizes.group_maxima]);
    const std::unique_ptr<Candidate<T>[]> candidates(new Candidate<T>[threads * sizes.candidates]);
    const std::unique_ptr<T[]> exponentials(new T[threads * sizes.exponentials]);
    const std::unique_ptr<double[]> cumulative(new double[threads * sizes.cumulative]);
    const std::unique_ptr<double[]> draws(new double[threads * sizes.draws]);
    const std::unique_ptr<DrawnClass[]> drawn(new DrawnClass[threads * sizes.drawn]);
    const std::unique_ptr<std::size_t[]> bad_rows(new std::size_t[tasks]);
    ThreadPool::run(tasks, threads, [&](std::size_t task, std::size_t worker) {
        const CacheScratch<T> scratch{group_maxima.get() + worker * sizes.group_maxima,
                                      candidates.get() + worker * sizes.candidates,
                                      exponentials.get() + worker * sizes.exponentials,
                                      cumulative.get() + worker * sizes.cumulative,
                                      draws.get() + worker * sizes.draws,
                                      drawn.get() + worker * sizes.drawn};
        const std::size_t begin = task * rows_per_task;
        bad_rows[task] = kernel(problem, begin, std::min(rows, begin + rows_per_task), scratch);
    });
    // The first bad row of the batch, whichever thread found it: tasks are in row order.
    for (std::size_t task = 0; task < tasks; ++task)
        if (bad_rows[task] != no_bad_row)
            throw std::invalid_argument(bad_row_message<T>(
                {problem.logits, problem.rows, problem.classes, problem.logit_stride}, bad_rows[task], leading));
}

// top_k() with the row kernel given, and the logits' leading shape to name rows by (the Python module's).
template <class T>
void top_k_with(CacheKernel<T> kernel, MatrixView<const T> teacher_logits, std::size_t k, double temperature,
                const MatrixView<std::int32_t>& indices, const MatrixView<T>& logprobs, std::size_t num_threads,
                LeadingShape leading = {}) {
    check_cache_classes(teacher_logits.rows, teacher_logits.cols);
    if (k < 1 || k > teacher_logits.cols)
        throw std::invalid_argument("k must be an integer in [1, C] (C = " + std::to_string(teacher_logits.cols) +
                                    "), got " + std::to_string(k));
    const CacheProblem<T> problem = cache_problem(teacher_logits, k, temperature, indices, logprobs);
    CacheScratchSizes sizes;
    sizes.group_maxima = top_k_groups(teacher_logits.cols, k);
    sizes.candidates = teacher_logits.cols;
    run_cache(kernel, problem, num_threads, teacher_logits.cols, sizes, leading);
}

// sample_teacher() with the row kernel given, as top_k_with().
template <class T>
void sample_teacher_with(CacheKernel<T> kernel, MatrixView<const T> teacher_logits, std::size_t num_samples,
                         double temperature, std::uint64_t seed, const MatrixView<std::int32_t>& indices,
                         const MatrixView<T>& logprobs, std::size_t num_threads, LeadingShape leading = {}) {
    check_cache_classes(teacher_logits.rows, teacher_logits.cols);
    if (num_samples < 1)
        throw std::invalid_argument("num_samples must be an integer >= 1, got " + std::to_string(num_samples));
    const std::size_t classes = teacher_logits.cols;
    CacheProblem<T> problem =
        cache_problem(teacher_logits, sample_slots(num_samples, classes), temperature, indices, logprobs);
    problem.num_samples = num_samples;
    problem.seed = seed;
    CacheScratchSizes sizes;
    sizes.exponentials = blocks_of(classes) * sample_block;
    sizes.cumulative = blocks_of(classes) + 1;
    sizes.draws = num_samples;
    sizes.drawn = problem.slots;
    run_cache(kernel, problem, num_threads, classes + num_samples, sizes, leading);
}

}  // namespace detail

// The k largest logits of each row of teacher_logits (ties to the lower index), sorted by decreasing logit
// (ties: lower index first), into indices and logprobs (rows x k each, any row strides): their classes and
// their exact log-softmax at `temperature`, (t_i - max t) / T - log sum_c e^((t_c - max t) / T) over the whole
// row. -inf logits are masked classes, listed only in rows with fewer than k finite logits (log-probability
// -inf: an empty slot). num_threads: 1 runs on the calling thread, 0 on every hardware thread; the results
// are bitwise identical whatever the count.
//
// Throws std::invalid_argument, before anything is written, for k outside [1, C], a temperature outside
// [min_temperature, max_temperature], outputs of the wrong shape or sharing memory with the logits, and more
// than max_threads threads. A row that holds NaN or +inf, or nothing but -inf, has no softmax: the call then
// throws naming the first such row, (i,) for row i, and what the outputs hold is unspecified (rows are checked
// as they are read, so that the logits are read once).
template <class T>
void top_k(MatrixView<const typename detail::NotDeduced<T>::type> teacher_logits, std::size_t k, double temperature,
           const MatrixView<std::int32_t>& indices, const MatrixView<T>& logprobs, std::size_t num_threads = 1) {
    detail::top_k_with<T>(detail::top_k_kernel<T>(), teacher_logits, k, temperature, indices, logprobs, num_threads);
}

// num_samples draws with replacement from each row's softmax(t / T); each class drawn is listed once, by
// decreasing count (ties to the lower index), with log(count / num_samples), into indices and logprobs
// (rows x sample_slots(num_samples, C) each). Unused slots hold log-probability -inf and repeat the index
// listed last. A row's draws depend on `seed` and the row's index alone (whatever num_threads is), so a
// batch built in pieces should give each piece its own seed. A class of probability 0 (a -inf logit, or an
// exponential below T's normal range) is never drawn. Errors as top_k's, with num_samples >= 1 for k.
template <class T>
void sample_teacher(MatrixView<const typename detail::NotDeduced<T>::type> teacher_logits, std::size_t num_samples,
                    double temperature, std::uint64_t seed, const MatrixView<std::int32_t>& indices,
                    const MatrixView<T>& logprobs, std::size_t num_threads = 1) {
    detail::sample_teacher_with<T>(detail::sample_kernel<T>(), teacher_logits, num_samples, temperature, seed, indices,
                                   logprobs, num_threads);
}

}  // namespace kdloss
