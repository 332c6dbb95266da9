#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace kdloss {

// A row-major matrix in the caller's memory: `rows` rows of `cols` contiguous elements, the starts of
// consecutive rows `row_stride` elements apart. A stride other than `cols` lets a host pass a slice of a
// larger tensor without copying it.
template <class T>
struct MatrixView {
    T* data = nullptr;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::ptrdiff_t row_stride = 0;

    constexpr MatrixView() noexcept = default;
    constexpr MatrixView(T* data_, std::size_t rows_, std::size_t cols_) noexcept
        : data(data_), rows(rows_), cols(cols_), row_stride(static_cast<std::ptrdiff_t>(cols_)) {}
    constexpr MatrixView(T* data_, std::size_t rows_, std::size_t cols_, std::ptrdiff_t row_stride_) noexcept
        : data(data_), rows(rows_), cols(cols_), row_stride(row_stride_) {}

    // A view of mutable elements is also a view of const ones, as T* converts to const T* (like std::span).
    template <class U, class = std::enable_if_t<!std::is_const_v<U> && std::is_same_v<const U, T>>>
    constexpr MatrixView(const MatrixView<U>& other) noexcept
        : data(other.data), rows(other.rows), cols(other.cols), row_stride(other.row_stride) {}

    T* row(std::size_t i) const noexcept { return data + static_cast<std::ptrdiff_t>(i) * row_stride; }
};

// Class-index labels, one per row, `stride` elements apart.
struct ClassIndices {
    const std::int64_t* data = nullptr;
    std::size_t count = 0;
    std::ptrdiff_t stride = 1;

    std::int64_t operator[](std::size_t i) const noexcept { return data[static_cast<std::ptrdiff_t>(i) * stride]; }
};

// The true labels of a batch: none, one class index per row, or one target distribution per row (one-hot
// or soft). Implicitly built from either view, so `loss.compute_loss(s, t, indices)` reads naturally.
template <class T>
struct Labels {
    enum class Kind { none, class_indices, distributions };

    Kind kind = Kind::none;
    ClassIndices indices{};
    MatrixView<const T> distributions{};

    constexpr Labels() noexcept = default;
    constexpr Labels(ClassIndices indices_) noexcept : kind(Kind::class_indices), indices(indices_) {}
    constexpr Labels(MatrixView<const T> distributions_) noexcept
        : kind(Kind::distributions), distributions(distributions_) {}
    constexpr Labels(MatrixView<T> distributions_) noexcept
        : kind(Kind::distributions), distributions(distributions_) {}
};

}  // namespace kdloss
