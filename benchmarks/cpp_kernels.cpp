// Times the core as a C++ host compiles it: loss_and_gradient on one thread, class-index labels, T = 3,
// alpha = 0.3, in nanoseconds per element (best of many calls, so inputs that fit stay in cache as in a training
// step). For comparing the host's own flags, e.g. optimisation levels or instruction sets, header-only; no Python
// needed (benchmarks/cpp_targets.py builds it with CMake, linked with each target, and compares them):
//
//   g++ -O2 -std=c++17 -Icsrc/include benchmarks/cpp_kernels.cpp -o cpp_kernels -pthread && ./cpp_kernels
//   g++ -O3 -march=native -std=c++17 -Icsrc/include benchmarks/cpp_kernels.cpp -o cpp_kernels -pthread && ...
#include <kdloss/kdloss.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

template <class T>
double nanoseconds_per_element(std::size_t rows, std::size_t classes) {
    std::mt19937_64 rng(0);
    std::normal_distribution<double> normal(0.0, 2.0);
    std::vector<T> student(rows * classes), teacher(rows * classes), gradient(rows * classes);
    for (T& x : student) x = static_cast<T>(normal(rng));
    for (T& x : teacher) x = static_cast<T>(normal(rng));
    std::vector<std::int64_t> labels(rows);
    for (std::size_t i = 0; i < rows; ++i) labels[i] = static_cast<std::int64_t>(rng() % classes);

    const kdloss::DistillationLoss<T> kd(3.0, 0.3);  // one thread
    auto call = [&] {
        return kd.loss_and_gradient({student.data(), rows, classes}, {teacher.data(), rows, classes},
                                    kdloss::ClassIndices{labels.data(), rows}, {gradient.data(), rows, classes});
    };
    volatile double sink = call();
    // Calls per sample: about a millisecond's worth; the best of 200 samples.
    const auto t0 = std::chrono::steady_clock::now();
    sink = call();
    const double once = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const int calls = std::max(1, static_cast<int>(1e-3 / std::max(once, 1e-9)));
    double best = 1e300;
    for (int sample = 0; sample < 200; ++sample) {
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < calls; ++i) sink = call();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls);
    }
    (void)sink;
    return best * 1e9 / static_cast<double>(rows * classes);
}

int main(int argc, char** argv) {
    // --isa: only which kernels run (kdloss::kdloss chooses them at run time; header-only: "header_only").
    if (argc > 1 && std::string(argv[1]) == "--isa") {
        std::printf("%s\n", kdloss::isa_info().active.c_str());
        return 0;
    }
    // bench.py's shapes; then rows of a little more than 100 classes, still in blocks, and a batch of short
    // rows much larger than L3, whose blocks fetch the next one ahead (row_kernel.hpp, run_rows.hpp).
    const std::size_t shapes[][2] = {{256, 1000}, {64, 32000}, {8, 128256}, {4096, 10},
                                     {32, 100},   {256, 128},  {16384, 100}};
    std::printf("shape         float32 ns/elem  float64 ns/elem\n");
    for (const auto& shape : shapes)
        std::printf("%-12s %16.3f %16.3f\n", (std::to_string(shape[0]) + "x" + std::to_string(shape[1])).c_str(),
                    nanoseconds_per_element<float>(shape[0], shape[1]),
                    nanoseconds_per_element<double>(shape[0], shape[1]));
    return 0;
}
