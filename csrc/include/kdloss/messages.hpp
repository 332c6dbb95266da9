#pragma once

// Formatting for error messages, shared by the C++ API and the Python bindings so that both say the
// same thing.

#include <charconv>
#include <cmath>
#include <cstddef>
#include <string>

namespace kdloss::detail {

// The shortest text that reads back as the same double ("0.3", "-1", "inf", "nan").
inline std::string format_number(double value) {
    if (std::isnan(value)) return "nan";  // whatever its sign bit says
    char buffer[32];
    const auto result = std::to_chars(buffer, buffer + sizeof buffer, value);
    return std::string(buffer, result.ptr);
}

// Appended piece by piece: `"(" + std::to_string(...)` trips a known false -Wrestrict warning of GCC 12
// at -O2 and above in C++20, which a host building with -Wall -Werror would see.
inline std::string format_shape(std::size_t rows, std::size_t cols) {
    std::string text = "(";
    text += std::to_string(rows);
    text += ", ";
    text += std::to_string(cols);
    text += ')';
    return text;
}

// How messages name row i of a batch of rows: (i,).
inline std::string format_row(std::size_t row) {
    std::string text = "(";
    text += std::to_string(row);
    text += ",)";
    return text;
}

// How they name a row of an N-D array whose leading axes were flattened into rows (C order): its index in their
// shape, as Python writes a tuple: (3, 17), (2,), and () for the one row of a 1-D array. The text of
// SparseTeacherView::row_name.
inline std::string format_row(std::size_t row, const std::size_t* shape, std::size_t ndim) {
    if (ndim == 0) return "()";
    std::string text = ndim == 1 ? ",)" : ")";
    for (std::size_t axis = ndim; axis-- > 0;) {
        const std::size_t extent = shape[axis] == 0 ? 1 : shape[axis];
        text.insert(0, std::to_string(row % extent));
        row /= extent;
        if (axis > 0) text.insert(0, ", ");
    }
    return '(' + text;
}

}  // namespace kdloss::detail
