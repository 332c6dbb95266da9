#pragma once

// NumPy arrays to kdloss views, in place. Every check that keeps the core from reading or writing out of
// bounds lives here; the Python layer converts what it can beforehand, so these only fire when the private
// module is called directly or the caller's arrays are unusable.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "kdloss/views.hpp"

namespace kdloss::python {

namespace py = pybind11;

inline std::string shape_text(const py::array& array) {
    std::string text = "(";
    for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
        if (axis > 0) text += ", ";
        text += std::to_string(array.shape(axis));
    }
    return text + (array.ndim() == 1 ? ",)" : ")");
}

inline bool same_shape(const py::array& a, const py::array& b) {
    if (a.ndim() != b.ndim()) return false;
    for (py::ssize_t axis = 0; axis < a.ndim(); ++axis)
        if (a.shape(axis) != b.shape(axis)) return false;
    return true;
}

inline bool has_flag(const py::array& array, int flag) {
    return (array.flags() & flag) != 0;
}

// Rows of contiguous elements: the last axis has unit stride and the row stride is a whole number of
// elements. Anything else would need a copy, which the Python layer makes visibly before calling.
inline void require_row_layout(const py::array& array, const char* name) {
    if (array.size() == 0) return;  // nothing is read; NumPy may give such arrays any strides
    const auto itemsize = array.itemsize();
    const bool aligned = has_flag(array, py::detail::npy_api::NPY_ARRAY_ALIGNED_);
    const bool unit_columns = array.ndim() == 0 || array.shape(array.ndim() - 1) <= 1 ||
                              array.strides(array.ndim() - 1) == itemsize;
    const bool whole_rows = array.ndim() < 2 || array.strides(0) % itemsize == 0;
    if (!(aligned && unit_columns && whole_rows))
        throw py::value_error(std::string(name) +
                              " must be aligned with contiguous rows (unit stride along the last axis)");
}

template <class T>
MatrixView<const T> logits_view(const py::array& array, const char* name) {
    if (array.ndim() != 1 && array.ndim() != 2)
        throw py::value_error(std::string(name) + " must be 1-D (C,) or 2-D (B, C), got shape " +
                              shape_text(array));
    require_row_layout(array, name);
    const auto* data = static_cast<const T*>(array.data());
    const auto cols = static_cast<std::size_t>(array.shape(array.ndim() - 1));
    if (array.ndim() == 1) return {data, 1, cols};
    const auto rows = static_cast<std::size_t>(array.shape(0));
    const bool strided = rows > 1 && cols > 0;
    const auto row_stride = strided ? array.strides(0) / array.itemsize() : static_cast<py::ssize_t>(cols);
    return {data, rows, cols, row_stride};
}

// Class indices have the logits' leading shape: (B,) for (B, C) logits, () for one row.
inline ClassIndices class_indices_view(const py::array& labels, const py::array& logits) {
    if (labels.ndim() != logits.ndim() - 1 || (labels.ndim() == 1 && labels.shape(0) != logits.shape(0)))
        throw py::value_error("true_labels as class indices must have shape " +
                              (logits.ndim() == 1 ? std::string("()") : "(" + std::to_string(logits.shape(0)) + ",)") +
                              ", got " + shape_text(labels));
    if (!has_flag(labels, py::detail::npy_api::NPY_ARRAY_ALIGNED_) ||
        (labels.ndim() == 1 && labels.strides(0) % labels.itemsize() != 0))
        throw py::value_error("true_labels must be an aligned int64 array");
    const auto* data = static_cast<const std::int64_t*>(labels.data());
    if (labels.ndim() == 0) return {data, 1, 1};
    return {data, static_cast<std::size_t>(labels.shape(0)), labels.strides(0) / labels.itemsize()};
}

// The byte range an array's elements span, for overlap checks.
struct ByteRange {
    const char* begin = nullptr;
    const char* end = nullptr;
};

inline ByteRange byte_range(const py::array& array) {
    if (array.size() == 0) return {};
    const char* begin = static_cast<const char*>(array.data());
    const char* end = begin + array.itemsize();
    for (py::ssize_t axis = 0; axis < array.ndim(); ++axis) {
        const py::ssize_t extent = (array.shape(axis) - 1) * array.strides(axis);
        (extent < 0 ? begin : end) += extent;
    }
    return {begin, end};
}

inline bool overlaps(const py::array& a, const py::array& b) {
    const ByteRange x = byte_range(a), y = byte_range(b);
    return x.begin != nullptr && y.begin != nullptr && x.begin < y.end && y.begin < x.end;
}

}  // namespace kdloss::python
