#pragma once

// kdloss::DistillationLoss<T>: the knowledge-distillation loss of Hinton et al. (2015) over a batch,
// with the parameters, validation and semantics of the Python class kdloss.DistillationLoss.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kdloss/messages.hpp"
#include "kdloss/row_kernel.hpp"
#include "kdloss/views.hpp"

namespace kdloss {

enum class Reduction { mean, sum, none };

inline Reduction parse_reduction(std::string_view name) {
    if (name == "mean") return Reduction::mean;
    if (name == "sum") return Reduction::sum;
    if (name == "none") return Reduction::none;
    throw std::invalid_argument("reduction must be one of 'mean', 'sum', 'none', got '" + std::string(name) +
                                "'");
}

inline const char* reduction_name(Reduction reduction) noexcept {
    switch (reduction) {
        case Reduction::mean: return "mean";
        case Reduction::sum: return "sum";
        case Reduction::none: return "none";
    }
    return "mean";
}

template <class T>
class DistillationLoss {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                  "kdloss::DistillationLoss is defined for float and double");

public:
    static constexpr std::int64_t default_ignore_index = -100;

    explicit DistillationLoss(double temperature = 3.0, double alpha = 0.3, Reduction reduction = Reduction::mean,
                              std::int64_t ignore_index = default_ignore_index)
        : temperature_(checked_temperature(temperature)),
          alpha_(checked_alpha(alpha)),
          reduction_(reduction),
          ignore_index_(ignore_index) {}

    double temperature() const noexcept { return temperature_; }
    double alpha() const noexcept { return alpha_; }
    Reduction reduction() const noexcept { return reduction_; }
    std::int64_t ignore_index() const noexcept { return ignore_index_; }
    void set_temperature(double temperature) { temperature_ = checked_temperature(temperature); }
    void set_alpha(double alpha) { alpha_ = checked_alpha(alpha); }

    // The reduced loss ("none": the sum of the row losses, the quantity whose gradient is returned).
    double compute_loss(MatrixView<const T> student_logits, MatrixView<const T> teacher_logits,
                        const Labels<T>& true_labels = {}) const {
        return evaluate(student_logits, teacher_logits, true_labels, nullptr, nullptr);
    }

    // Writes the exact gradient of the reduced loss with respect to the student logits.
    void compute_gradient(MatrixView<const T> student_logits, MatrixView<const T> teacher_logits,
                          const Labels<T>& true_labels, const MatrixView<T>& gradient) const {
        evaluate(student_logits, teacher_logits, true_labels, nullptr, &gradient);
    }

    double loss_and_gradient(MatrixView<const T> student_logits, MatrixView<const T> teacher_logits,
                             const Labels<T>& true_labels, const MatrixView<T>& gradient) const {
        return evaluate(student_logits, teacher_logits, true_labels, nullptr, &gradient);
    }

    // The general entry point. Returns the reduced loss; writes each row's loss to row_losses[i] (ignored
    // rows: 0) and the gradient to *gradient when they are not null. Every argument is checked before
    // anything is written, so on an exception the outputs are untouched.
    double evaluate(MatrixView<const T> student_logits, MatrixView<const T> teacher_logits,
                    const Labels<T>& true_labels, T* row_losses, const MatrixView<T>* gradient) const {
        check_shapes(student_logits, teacher_logits, true_labels, gradient);
        const std::size_t rows = student_logits.rows, classes = student_logits.cols;
        const std::size_t counted_rows = count_rows_and_check_labels(true_labels, rows, classes);

        const bool labelled = true_labels.kind != Labels<T>::Kind::none;
        detail::RowWeights weights;
        weights.temperature = temperature_;
        weights.inverse_temperature = 1.0 / temperature_;
        weights.soft_weight = labelled ? 1.0 - alpha_ : 1.0;
        weights.hard_weight = labelled ? alpha_ : 0.0;
        weights.gradient_scale =
            reduction_ == Reduction::mean && counted_rows > 0 ? 1.0 / static_cast<double>(counted_rows) : 1.0;

        std::vector<T> scratch_storage(rows > 0 ? 3 * classes : 0);
        const detail::RowScratch<T> scratch{scratch_storage.data(), scratch_storage.data() + classes,
                                            scratch_storage.data() + 2 * classes};

        // Row losses are summed in row order, whatever computes them, so the result is reproducible.
        double total = 0.0;
        for (std::size_t i = 0; i < rows; ++i) {
            T* gradient_row = gradient != nullptr ? gradient->row(i) : nullptr;
            detail::RowTarget<T> target;
            if (true_labels.kind == Labels<T>::Kind::class_indices) {
                const std::int64_t label = true_labels.indices[i];
                if (label == ignore_index_) {
                    if (row_losses != nullptr) row_losses[i] = T(0);
                    if (gradient_row != nullptr) std::fill(gradient_row, gradient_row + classes, T(0));
                    continue;
                }
                target.kind = detail::RowTarget<T>::Kind::class_index;
                target.class_index = label;
            } else if (true_labels.kind == Labels<T>::Kind::distributions) {
                target.kind = detail::RowTarget<T>::Kind::distribution;
                target.distribution = true_labels.distributions.row(i);
            }
            const double row_loss = detail::distill_row(student_logits.row(i), teacher_logits.row(i), classes,
                                                        target, weights, scratch, gradient_row);
            if (row_losses != nullptr) row_losses[i] = static_cast<T>(row_loss);
            total += row_loss;
        }
        if (reduction_ == Reduction::mean) return counted_rows > 0 ? total / static_cast<double>(counted_rows) : 0.0;
        return total;
    }

private:
    static double checked_temperature(double temperature) {
        if (!(std::isfinite(temperature) && temperature > 0.0))
            throw std::invalid_argument("temperature must be finite and > 0, got " + detail::format_number(temperature));
        return temperature;
    }

    static double checked_alpha(double alpha) {
        if (!(alpha >= 0.0 && alpha <= 1.0))
            throw std::invalid_argument("alpha must be finite and in [0, 1], got " + detail::format_number(alpha));
        return alpha;
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
            throw std::invalid_argument("true_labels must hold one class index per row (" +
                                        std::to_string(student.rows) + "), got " +
                                        std::to_string(labels.indices.count));
        if (labels.kind == Labels<T>::Kind::distributions &&
            (labels.distributions.rows != student.rows || labels.distributions.cols != student.cols))
            throw std::invalid_argument("true_labels target distributions must have the shape of student_logits " +
                                        detail::format_shape(student.rows, student.cols) + ", got " +
                                        detail::format_shape(labels.distributions.rows, labels.distributions.cols));
        if (gradient != nullptr && (gradient->rows != student.rows || gradient->cols != student.cols))
            throw std::invalid_argument("out must have the shape of student_logits " +
                                        detail::format_shape(student.rows, student.cols) + ", got " +
                                        detail::format_shape(gradient->rows, gradient->cols));
    }

    // Checks every label before any output is written; returns the number of rows that count in "mean".
    std::size_t count_rows_and_check_labels(const Labels<T>& labels, std::size_t rows, std::size_t classes) const {
        if (labels.kind == Labels<T>::Kind::class_indices) {
            std::size_t counted = 0;
            for (std::size_t i = 0; i < rows; ++i) {
                const std::int64_t label = labels.indices[i];
                if (label == ignore_index_) continue;
                if (label < 0 || static_cast<std::uint64_t>(label) >= classes)
                    throw std::invalid_argument("true_labels[" + std::to_string(i) + "] = " + std::to_string(label) +
                                                " is not a class index in [0, " + std::to_string(classes) +
                                                ") nor ignore_index (" + std::to_string(ignore_index_) + ")");
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

    double temperature_;
    double alpha_;
    Reduction reduction_;
    std::int64_t ignore_index_;
};

}  // namespace kdloss
