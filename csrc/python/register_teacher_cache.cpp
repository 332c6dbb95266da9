// kdloss._core.top_k and kdloss._core.sample_teacher: take the (..., C) logits' buffer in place, allocate the
// (..., K) outputs, and run the builders (teacher_cache.hpp) with the kernels chosen for this CPU and the GIL
// released. The checks of k, num_samples, the temperature and the rows are the core's. No math here.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kdloss/teacher_cache.hpp"
#include "numpy_views.hpp"
#include "register.hpp"

namespace kdloss::python {

namespace {

// A builder's outputs, of the logits' leading shape plus `slots`, and the core's views of them as rows x slots.
template <class T>
struct CacheOutputs {
    std::vector<std::size_t> leading;  // messages name rows by their index in this shape (see leading_shape)
    py::array_t<std::int32_t> indices;
    py::array_t<T> logprobs;
    std::size_t rows, slots;

    CacheOutputs(const py::array& logits, std::size_t rows_, std::size_t slots_)
        : leading(logits.shape(), logits.shape() + logits.ndim() - 1),
          indices(shape_with(leading, slots_)),
          logprobs(shape_with(leading, slots_)),
          rows(rows_),
          slots(slots_) {}

    MatrixView<std::int32_t> indices_view() { return {indices.mutable_data(), rows, slots}; }
    MatrixView<T> logprobs_view() { return {logprobs.mutable_data(), rows, slots}; }
    // Not null even for no leading axes (1-D logits, whose one row is named ()): std::vector's may be.
    detail::LeadingShape leading_shape() const { return {leading.empty() ? &no_axes : leading.data(), leading.size()}; }
    static constexpr std::size_t no_axes = 0;
    py::tuple result() const { return py::make_tuple(indices, logprobs); }

    static std::vector<py::ssize_t> shape_with(const std::vector<std::size_t>& leading, std::size_t slots) {
        std::vector<py::ssize_t> shape(leading.begin(), leading.end());
        shape.push_back(static_cast<py::ssize_t>(slots));
        return shape;
    }
};

// Calls build(T{}) for the logits' dtype.
template <class Build>
py::tuple by_dtype(const py::array& logits, Build&& build) {
    if (logits.dtype().equal(py::dtype::of<float>())) return build(float{});
    if (logits.dtype().equal(py::dtype::of<double>())) return build(double{});
    throw py::type_error("teacher_logits must be a float32 or float64 array, got dtype " +
                         std::string(py::str(logits.dtype())));
}

// Returns (indices, logprobs). An invalid k is the core's to report: the outputs are sized so that it can.
py::tuple top_k(const py::array& logits, std::size_t k, double temperature, std::size_t num_threads) {
    return by_dtype(logits, [&](auto zero) {
        using T = decltype(zero);
        const MatrixView<const T> view = logits_view<T>(logits, "teacher_logits");
        CacheOutputs<T> outputs(logits, view.rows, std::min(k, view.cols));
        const MatrixView<std::int32_t> indices = outputs.indices_view();
        const MatrixView<T> logprobs = outputs.logprobs_view();
        {
            py::gil_scoped_release release;
            detail::top_k_with<T>(detail::top_k_kernel<T>(), view, k, temperature, indices, logprobs, num_threads,
                                  outputs.leading_shape());
        }
        return outputs.result();
    });
}

py::tuple sample_teacher(const py::array& logits, std::size_t num_samples, double temperature, std::uint64_t seed,
                         std::size_t num_threads) {
    return by_dtype(logits, [&](auto zero) {
        using T = decltype(zero);
        const MatrixView<const T> view = logits_view<T>(logits, "teacher_logits");
        CacheOutputs<T> outputs(logits, view.rows, sample_slots(num_samples, view.cols));
        const MatrixView<std::int32_t> indices = outputs.indices_view();
        const MatrixView<T> logprobs = outputs.logprobs_view();
        {
            py::gil_scoped_release release;
            detail::sample_teacher_with<T>(detail::sample_kernel<T>(), view, num_samples, temperature, seed, indices,
                                           logprobs, num_threads, outputs.leading_shape());
        }
        return outputs.result();
    });
}

}  // namespace

void register_teacher_cache(py::module_& module) {
    module.attr("max_cache_classes") = max_cache_classes;
    module.def("top_k", &top_k, py::arg("teacher_logits"), py::arg("k"), py::arg("temperature"), py::arg("num_threads"),
               "(indices int32, logprobs), each (..., k), of each row's k largest logits (private; use kdloss.top_k). "
               "teacher_logits: float32 or float64, (..., C), rows read in place.");
    module.def("sample_teacher", &sample_teacher, py::arg("teacher_logits"), py::arg("num_samples"),
               py::arg("temperature"), py::arg("seed"), py::arg("num_threads"),
               "(indices int32, logprobs), each (..., min(num_samples, C)), of num_samples draws from each row's "
               "softmax (private; use kdloss.sample_teacher). teacher_logits: float32 or float64, (..., C), rows "
               "read in place.");
}

}  // namespace kdloss::python
