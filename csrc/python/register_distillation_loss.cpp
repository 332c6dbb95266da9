// kdloss._core.DistillationLoss: validates NumPy arguments, takes their buffers in place, allocates the
// outputs, and runs the core with the GIL released. No math here.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kdloss/distillation_loss.hpp"
#include "numpy_views.hpp"
#include "register.hpp"

namespace kdloss::python {

namespace {

// Immutable once built, so concurrent calls from several threads need no lock, and the Python class
// changes a parameter by building a new one.
class BoundDistillationLoss {
public:
    BoundDistillationLoss(double temperature, double alpha, const std::string& reduction, std::int64_t ignore_index,
                          std::size_t num_threads, const std::string& divergence, double beta, double skew,
                          const std::string& tail)
        : BoundDistillationLoss(Parameters{temperature, alpha, parse_reduction(reduction), ignore_index, num_threads,
                                           parse_divergence(divergence), beta, skew, parse_tail(tail)}) {}
    explicit BoundDistillationLoss(const Parameters& parameters) : double_loss_(parameters), float_loss_(parameters) {}

    double temperature() const { return double_loss_.temperature(); }
    double alpha() const { return double_loss_.alpha(); }
    std::string reduction() const { return reduction_name(double_loss_.reduction()); }
    std::int64_t ignore_index() const { return double_loss_.ignore_index(); }
    std::size_t num_threads() const { return double_loss_.num_threads(); }
    std::string divergence() const { return divergence_name(double_loss_.divergence()); }
    double beta() const { return double_loss_.beta(); }
    double skew() const { return double_loss_.skew(); }
    std::string tail() const { return tail_name(double_loss_.tail()); }

    // Returns (loss, gradient or None, counted rows): the loss is a float, or for reduction "none" an array
    // of the logits' leading shape. normalizer: None for the reduction's own divisor.
    py::tuple evaluate(const py::array& student, const py::object& teacher, const py::object& labels,
                       const py::object& out, bool want_gradient, std::optional<double> normalizer) const {
        if (student.dtype().equal(py::dtype::of<double>()))
            return evaluate_as(double_loss_, student, teacher, labels, out, want_gradient, normalizer);
        if (student.dtype().equal(py::dtype::of<float>()))
            return evaluate_as(float_loss_, student, teacher, labels, out, want_gradient, normalizer);
        throw py::type_error("student_logits must be a float32 or float64 array, got dtype " +
                             std::string(py::str(student.dtype())));
    }

    // Returns (soft, hard): floats, or for reduction "none" arrays of the logits' leading shape.
    py::tuple parts(const py::array& student, const py::object& teacher, const py::object& labels,
                    std::optional<double> normalizer) const {
        if (student.dtype().equal(py::dtype::of<double>()))
            return parts_as(double_loss_, student, teacher, labels, normalizer);
        if (student.dtype().equal(py::dtype::of<float>()))
            return parts_as(float_loss_, student, teacher, labels, normalizer);
        throw py::type_error("student_logits must be a float32 or float64 array, got dtype " +
                             std::string(py::str(student.dtype())));
    }

private:
    // The logits and labels as the core's views, after the binding's checks (buffers and dtypes); `holder`
    // keeps the labels' array alive while the views are used.
    // A sparse teacher's arrays, (indices, logprobs), as the core's view: each of the student's leading shape
    // and (..., K), read in place.
    struct SparseInputs {
        SparseTeacherView view;
        std::vector<std::size_t> leading_shape;  // names rows in messages; the view points at it
    };

    template <class T>
    struct Inputs {
        MatrixView<const T> student, teacher;
        std::unique_ptr<SparseInputs> sparse;  // set: the teacher is this one, not `teacher`
        Labels<T> labels;
        std::optional<py::array> holder;

        typename DistillationLoss<T>::Teacher teacher_argument() const {
            if (sparse) return sparse->view;
            return teacher;
        }
    };

    template <class T>
    static std::unique_ptr<SparseInputs> sparse_inputs(const py::tuple& arrays, const py::array& student) {
        if (arrays.size() != 2) throw py::type_error("a sparse teacher is passed as (indices, logprobs)");
        const auto indices = arrays[0].cast<py::array>();
        const auto logprobs = arrays[1].cast<py::array>();
        const py::ssize_t leading = student.ndim() - 1;
        bool matches = indices.ndim() == student.ndim() && same_shape(indices, logprobs);
        for (py::ssize_t axis = 0; matches && axis < leading; ++axis)
            matches = indices.shape(axis) == student.shape(axis);
        if (!matches)
            throw py::value_error("a sparse teacher must have the leading shape of student_logits " +
                                  shape_text(student.shape(), leading) + ", got indices " + shape_text(indices) +
                                  " and logprobs " + shape_text(logprobs));
        require_row_layout(indices, "a sparse teacher's indices");
        require_row_layout(logprobs, "a sparse teacher's logprobs");
        auto inputs = std::make_unique<SparseInputs>();
        const auto k = static_cast<std::size_t>(indices.shape(leading));
        std::size_t rows = 1;
        for (py::ssize_t axis = 0; axis < leading; ++axis) {
            inputs->leading_shape.push_back(static_cast<std::size_t>(student.shape(axis)));
            rows *= static_cast<std::size_t>(student.shape(axis));
        }
        const auto row_stride = [&](const py::array& array) {
            const auto packed = static_cast<py::ssize_t>(k);
            return rows > 1 && k > 0 ? collapsed_row_axis(array, leading, packed).stride : packed;
        };
        const auto make = [&](const auto* index_data, const auto* logprob_data) {
            inputs->view =
                SparseTeacherView(index_data, row_stride(indices), logprob_data, row_stride(logprobs), rows, k);
        };
        const auto with_logprobs = [&](const auto* index_data) {
            if (logprobs.dtype().equal(py::dtype::of<float>()))
                make(index_data, static_cast<const float*>(logprobs.data()));
            else if (logprobs.dtype().equal(py::dtype::of<double>()))
                make(index_data, static_cast<const double*>(logprobs.data()));
            else if (logprobs.dtype().equal(py::dtype("float16")))
                make(index_data, static_cast<const Float16*>(logprobs.data()));
            else
                throw py::type_error("a sparse teacher's logprobs must be float16, float32 or float64, got dtype " +
                                     std::string(py::str(logprobs.dtype())));
        };
        if (indices.dtype().equal(py::dtype::of<std::int32_t>()))
            with_logprobs(static_cast<const std::int32_t*>(indices.data()));
        else if (indices.dtype().equal(py::dtype::of<std::int64_t>()))
            with_logprobs(static_cast<const std::int64_t*>(indices.data()));
        else
            throw py::type_error("a sparse teacher's indices must be int32 or int64, got dtype " +
                                 std::string(py::str(indices.dtype())));
        inputs->view.set_leading_shape(inputs->leading_shape.data(), inputs->leading_shape.size());
        return inputs;
    }

    template <class T>
    static Inputs<T> inputs_as(const py::array& student, const py::object& teacher_object,
                               const py::object& labels_object) {
        const auto dtype = py::dtype::of<T>();
        Inputs<T> inputs{logits_view<T>(student, "student_logits"), {}, {}, {}, {}};
        if (py::isinstance<py::tuple>(teacher_object)) {
            inputs.sparse = sparse_inputs<T>(py::reinterpret_borrow<py::tuple>(teacher_object), student);
        } else {
            const auto teacher = teacher_object.cast<py::array>();
            if (!teacher.dtype().equal(dtype))
                throw py::type_error("teacher_logits must have the dtype of student_logits (" +
                                     std::string(py::str(dtype)) + "), got " + std::string(py::str(teacher.dtype())));
            if (!same_shape(student, teacher))
                throw py::value_error("teacher_logits must have the shape of student_logits " + shape_text(student) +
                                      ", got " + shape_text(teacher));
            inputs.teacher = logits_view<T>(teacher, "teacher_logits");
        }
        if (!labels_object.is_none()) {
            if (!py::isinstance<py::array>(labels_object)) throw py::type_error("true_labels must be a numpy.ndarray");
            const auto& labels_array = inputs.holder.emplace(py::reinterpret_borrow<py::array>(labels_object));
            if (labels_array.dtype().equal(py::dtype::of<std::int64_t>())) {
                inputs.labels = class_indices_view(labels_array, student);
            } else if (labels_array.dtype().equal(dtype)) {
                if (!same_shape(labels_array, student))
                    throw py::value_error("true_labels as target distributions must have the shape of student_logits " +
                                          shape_text(student) + ", got " + shape_text(labels_array));
                inputs.labels = logits_view<T>(labels_array, "true_labels");
            } else {
                throw py::type_error("true_labels must be int64 class indices or " + std::string(py::str(dtype)) +
                                     " target distributions, got dtype " + std::string(py::str(labels_array.dtype())));
            }
        }
        return inputs;
    }

    template <class T>
    static py::tuple evaluate_as(const DistillationLoss<T>& loss, const py::array& student, const py::object& teacher,
                                 const py::object& labels_object, const py::object& out_object, bool want_gradient,
                                 std::optional<double> normalizer) {
        const auto dtype = py::dtype::of<T>();
        const Inputs<T> inputs = inputs_as<T>(student, teacher, labels_object);
        const MatrixView<const T>& student_view = inputs.student;
        const auto teacher_view = inputs.teacher_argument();
        const Labels<T>& labels = inputs.labels;

        std::optional<py::array_t<T>> gradient_array;
        if (!out_object.is_none()) {
            if (!want_gradient) throw py::value_error("out is only used by the gradient methods");
            if (!py::isinstance<py::array>(out_object)) throw py::type_error("out must be a numpy.ndarray");
            const auto out = py::reinterpret_borrow<py::array>(out_object);
            if (!out.dtype().equal(dtype))
                throw py::type_error("out must have the compute dtype " + std::string(py::str(dtype)) + ", got " +
                                     std::string(py::str(out.dtype())));
            if (!same_shape(out, student))
                throw py::value_error("out must have the shape of student_logits " + shape_text(student) + ", got " +
                                      shape_text(out));
            if (!has_flag(out, py::array::c_style)) throw py::value_error("out must be C-contiguous");
            if (!out.writeable()) throw py::value_error("out must be writeable");
            if (!has_flag(out, py::detail::npy_api::NPY_ARRAY_ALIGNED_)) throw py::value_error("out must be aligned");
            gradient_array.emplace(py::reinterpret_borrow<py::array_t<T>>(out));
        } else if (want_gradient) {
            std::vector<py::ssize_t> shape(student.shape(), student.shape() + student.ndim());
            gradient_array.emplace(shape);
        }

        const bool per_row = loss.reduction() == Reduction::none;
        std::optional<py::array_t<T>> row_losses;
        if (per_row) {
            std::vector<py::ssize_t> leading(student.shape(), student.shape() + student.ndim() - 1);
            row_losses.emplace(leading);
        }

        MatrixView<T> gradient_view;
        if (gradient_array) gradient_view = {gradient_array->mutable_data(), student_view.rows, student_view.cols};
        T* row_loss_data = row_losses ? row_losses->mutable_data() : nullptr;

        double value;
        std::size_t counted_rows = 0;
        {
            py::gil_scoped_release release;
            value = loss.evaluate(student_view, teacher_view, labels, row_loss_data,
                                  gradient_array ? &gradient_view : nullptr, normalizer, &counted_rows);
        }
        py::object loss_result = row_losses ? py::object(*row_losses) : py::object(py::float_(value));
        py::object gradient_result = gradient_array ? py::object(*gradient_array) : py::object(py::none());
        return py::make_tuple(std::move(loss_result), std::move(gradient_result), counted_rows);
    }

    template <class T>
    static py::tuple parts_as(const DistillationLoss<T>& loss, const py::array& student, const py::object& teacher,
                              const py::object& labels_object, std::optional<double> normalizer) {
        const Inputs<T> inputs = inputs_as<T>(student, teacher, labels_object);
        std::optional<py::array_t<T>> soft_rows, hard_rows;
        if (loss.reduction() == Reduction::none) {
            std::vector<py::ssize_t> leading(student.shape(), student.shape() + student.ndim() - 1);
            soft_rows.emplace(leading);
            hard_rows.emplace(leading);
        }
        LossParts parts;
        {
            py::gil_scoped_release release;
            parts = loss.loss_parts(inputs.student, inputs.teacher_argument(), inputs.labels,
                                    soft_rows ? soft_rows->mutable_data() : nullptr,
                                    hard_rows ? hard_rows->mutable_data() : nullptr, normalizer);
        }
        if (soft_rows) return py::make_tuple(*soft_rows, *hard_rows);
        return py::make_tuple(parts.soft, parts.hard);
    }

    DistillationLoss<double> double_loss_;
    DistillationLoss<float> float_loss_;
};

}  // namespace

void register_distillation_loss(py::module_& module) {
    py::tuple names(divergence_count);
    for (std::size_t i = 0; i < divergence_count; ++i) names[i] = divergence_names[i];
    module.attr("divergence_names") = names;
    module.def("reads_in_place", &has_row_layout, py::arg("array"),
               "Whether the kernels read this array in place (else kdloss's Python layer copies it first).");
    py::class_<BoundDistillationLoss>(module, "DistillationLoss",
                                      "Native engine behind kdloss.DistillationLoss (private; use the Python class).")
        .def(py::init<double, double, const std::string&, std::int64_t, std::size_t, const std::string&, double, double,
                      const std::string&>(),
             py::arg("temperature"), py::arg("alpha"), py::arg("reduction"), py::arg("ignore_index"),
             py::arg("num_threads"), py::arg("divergence"), py::arg("beta"), py::arg("skew"), py::arg("tail"))
        .def_property_readonly("temperature", &BoundDistillationLoss::temperature)
        .def_property_readonly("alpha", &BoundDistillationLoss::alpha)
        .def_property_readonly("reduction", &BoundDistillationLoss::reduction)
        .def_property_readonly("ignore_index", &BoundDistillationLoss::ignore_index)
        .def_property_readonly("num_threads", &BoundDistillationLoss::num_threads)
        .def_property_readonly("divergence", &BoundDistillationLoss::divergence)
        .def_property_readonly("beta", &BoundDistillationLoss::beta)
        .def_property_readonly("skew", &BoundDistillationLoss::skew)
        .def_property_readonly("tail", &BoundDistillationLoss::tail)
        .def("evaluate", &BoundDistillationLoss::evaluate, py::arg("student_logits"), py::arg("teacher_logits"),
             py::arg("true_labels"), py::arg("out"), py::arg("want_gradient"), py::arg("normalizer"))
        .def("parts", &BoundDistillationLoss::parts, py::arg("student_logits"), py::arg("teacher_logits"),
             py::arg("true_labels"), py::arg("normalizer"));
}

}  // namespace kdloss::python
