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

inline std::string shape_text(const py::ssize_t* shape, py::ssize_t ndim) {
    std::string text = "(";
    for (py::ssize_t axis = 0; axis < ndim; ++axis) text += (axis > 0 ? ", " : "") + std::to_string(shape[axis]);
    return text + (ndim == 1 ? ",)" : ")");
}

inline std::string shape_text(const py::array& array) { return shape_text(array.shape(), array.ndim()); }

inline bool same_shape(const py::array& a, const py::array& b) {
    if (a.ndim() != b.ndim()) return false;
    for (py::ssize_t axis = 0; axis < a.ndim(); ++axis)
        if (a.shape(axis) != b.shape(axis)) return false;
    return true;
}

inline bool has_flag(const py::array& array, int flag) { return (array.flags() & flag) != 0; }

// Whether the axes before `last_axis` collapse into one axis of rows, and that axis's stride in elements
// (`fallback` when no such axis is longer than 1). A transposed or sliced leading axis does not collapse; a
// broadcast one (stride 0) does. Axes of length 1 have no say in the layout.
struct RowAxis {
    bool collapses = true;
    py::ssize_t stride = 0;
};

inline RowAxis collapsed_row_axis(const py::array& array, py::ssize_t last_axis, py::ssize_t fallback) {
    bool found = false;
    py::ssize_t stride = 0, span = 0;  // span: bytes covered by the axes after the current one
    for (py::ssize_t axis = last_axis - 1; axis >= 0; --axis) {
        if (array.shape(axis) == 1) continue;
        if (found && array.strides(axis) != span) return {false, 0};
        if (!found) stride = array.strides(axis);
        found = true;
        span = array.strides(axis) * array.shape(axis);
    }
    return {true, found ? stride / array.itemsize() : fallback};
}

// Whether every axis longer than 1 among the first `axes` has a stride of whole elements (an axis of length 1 is
// never stepped along, and NumPy lets its stride be anything, even in a C-contiguous array).
inline bool whole_element_strides(const py::array& array, py::ssize_t axes) {
    for (py::ssize_t axis = 0; axis < axes; ++axis)
        if (array.shape(axis) > 1 && array.strides(axis) % array.itemsize() != 0) return false;
    return true;
}

// The one rule of what the kernels read in place (the Python layer asks it, as kdloss._core.reads_in_place,
// before deciding to copy): rows of contiguous elements, i.e. aligned, unit stride along the last axis, and
// leading axes that collapse into one axis of rows a whole number of elements apart.
inline bool has_row_layout(const py::array& array) {
    if (array.size() == 0 || array.ndim() == 0) return true;  // nothing is read; NumPy may give such arrays any strides
    const py::ssize_t last = array.ndim() - 1;
    const bool aligned = has_flag(array, py::detail::npy_api::NPY_ARRAY_ALIGNED_);
    const bool unit_columns = array.shape(last) <= 1 || array.strides(last) == array.itemsize();
    return aligned && unit_columns && whole_element_strides(array, last) &&
           collapsed_row_axis(array, last, 0).collapses;
}

// Anything else would need a copy, which the Python layer makes visibly before calling.
inline void require_row_layout(const py::array& array, const char* name) {
    if (!has_row_layout(array))
        throw py::value_error(std::string(name) +
                              " must be aligned with contiguous rows (unit stride along the last axis, leading axes "
                              "that collapse into one)");
}

// Logits of any rank >= 1: the last axis holds the classes, the leading axes are rows.
template <class T>
MatrixView<const T> logits_view(const py::array& array, const char* name) {
    if (array.ndim() < 1)
        throw py::value_error(std::string(name) + " must have at least one axis (..., C), got shape " +
                              shape_text(array));
    require_row_layout(array, name);
    const py::ssize_t last = array.ndim() - 1;
    const auto cols = static_cast<std::size_t>(array.shape(last));
    std::size_t rows = 1;
    for (py::ssize_t axis = 0; axis < last; ++axis) rows *= static_cast<std::size_t>(array.shape(axis));
    const auto packed = static_cast<py::ssize_t>(cols);
    const py::ssize_t stride = rows > 1 && cols > 0 ? collapsed_row_axis(array, last, packed).stride : packed;
    return {static_cast<const T*>(array.data()), rows, cols, stride};
}

// Class indices have the logits' leading shape: (B,) for (B, C) logits, () for one row, (B, S) for (B, S, C).
inline ClassIndices class_indices_view(const py::array& labels, const py::array& logits) {
    bool matches = labels.ndim() == logits.ndim() - 1;
    for (py::ssize_t axis = 0; matches && axis < labels.ndim(); ++axis)
        matches = labels.shape(axis) == logits.shape(axis);
    if (!matches)
        throw py::value_error("true_labels as class indices must have shape " +
                              shape_text(logits.shape(), logits.ndim() - 1) + ", got " + shape_text(labels));
    if (labels.ndim() > 0 && labels.size() > 0) {
        const bool aligned = has_flag(labels, py::detail::npy_api::NPY_ARRAY_ALIGNED_);
        // The labels' axes must collapse like the logits' leading axes: treat them as rows of one element.
        const RowAxis axis = collapsed_row_axis(labels, labels.ndim(), 1);
        if (!(aligned && whole_element_strides(labels, labels.ndim()) && axis.collapses))
            throw py::value_error("true_labels must be an aligned int64 array whose axes collapse into one");
        return {static_cast<const std::int64_t*>(labels.data()), static_cast<std::size_t>(labels.size()), axis.stride};
    }
    return {static_cast<const std::int64_t*>(labels.data()), static_cast<std::size_t>(labels.size()), 1};
}

}  // namespace kdloss::python
