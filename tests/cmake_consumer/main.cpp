// A C++ host computing the distillation loss and its gradient on its own buffers, with no Python.
// Prints the loss of the specification's check value (about 0.25465032) with 17 significant digits.
#include <kdloss/kdloss.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

int main() {
    // The host's tensors, row-major: a batch of B = 2 rows of C = 3 logits.
    const std::size_t B = 2, C = 3;
    const std::vector<double> student = {1.0, 2.0,  0.5,   // row 0
                                         0.3, -1.0, 4.0};  // row 1
    const std::vector<double> teacher = {1.5, 1.8, 0.6,    // row 0
                                         0.0, 0.0, 2.0};   // row 1
    const std::vector<std::int64_t> labels = {1, -100};    // class indices; -100 (ignore_index) leaves row 1 out
    std::vector<double> gradient(B * C);                   // written in place

    try {
        const kdloss::DistillationLoss<double> kd(/*temperature=*/3.0, /*alpha=*/0.5);  // reduction "mean"
        const double loss = kd.loss_and_gradient({student.data(), B, C}, {teacher.data(), B, C},
                                                 kdloss::ClassIndices{labels.data(), B}, {gradient.data(), B, C});
        std::printf("loss %.17g\n", loss);
        std::printf("gradient %.17g %.17g %.17g\n", gradient[0], gradient[1], gradient[2]);
    } catch (const std::invalid_argument& error) {  // bad parameters, shapes or labels; nothing was written
        std::fprintf(stderr, "kdloss: %s\n", error.what());
        return 1;
    }
    return 0;
}
