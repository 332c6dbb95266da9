// A checksum of the losses, row losses and gradients of many calls (short and long rows, every label form,
// integer and other temperatures, with and without the gradient), float and double: build it with the headers of two
// commits and the same flags, and equal checksums say that a refactoring of the kernels changed no bit of any result.
//   g++ -O2 -std=c++17 -Icsrc/include benchmarks/bitwise_check.cpp -pthread && ./a.out
// (and with -mavx2 -mfma, and -march=native, for the other kernels).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <kdloss/kdloss.hpp>
#include <random>
#include <vector>
template <class T>
std::uint64_t run() {
    std::mt19937_64 rng(7);
    std::normal_distribution<double> normal(0.0, 3.0);
    std::uint64_t hash = 1469598103934665603ull;
    auto mix = [&](const void* p, std::size_t n) {
        const unsigned char* b = static_cast<const unsigned char*>(p);
        for (std::size_t i = 0; i < n; ++i) hash = (hash ^ b[i]) * 1099511628211ull;
    };
    const std::size_t shapes[][2] = {{37, 10}, {19, 100}, {16, 128}, {33, 160}, {5, 161}, {7, 1000}, {3, 32000}};
    for (auto& shape : shapes) {
        const std::size_t B = shape[0], C = shape[1];
        std::vector<T> s(B * C), t(B * C), y(B * C), g(B * C), rows(B);
        for (auto& x : s) x = static_cast<T>(normal(rng));
        for (auto& x : t) x = static_cast<T>(normal(rng));
        for (auto& x : y) x = static_cast<T>(std::abs(normal(rng)));
        std::vector<std::int64_t> idx(B);
        for (std::size_t i = 0; i < B; ++i) idx[i] = i % 4 == 0 ? -100 : static_cast<std::int64_t>(rng() % C);
        for (double T_ : {1.0, 2.0, 3.0, 2.5})
            for (double alpha : {0.0, 0.3, 1.0})
                for (int form = 0; form < 3; ++form) {
                    kdloss::DistillationLoss<T> kd(T_, alpha, kdloss::Reduction::mean, -100, 1);
                    kdloss::Labels<T> labels;
                    if (form == 1) labels = kdloss::ClassIndices{idx.data(), B};
                    if (form == 2) labels = kdloss::MatrixView<const T>{y.data(), B, C};
                    kdloss::MatrixView<T> gv{g.data(), B, C};
                    const double loss = kd.evaluate({s.data(), B, C}, {t.data(), B, C}, labels, rows.data(), &gv);
                    mix(&loss, sizeof loss);
                    mix(g.data(), g.size() * sizeof(T));
                    mix(rows.data(), rows.size() * sizeof(T));
                    // Loss only: the kernels without a gradient pass.
                    const double alone = kd.evaluate({s.data(), B, C}, {t.data(), B, C}, labels, rows.data(), nullptr);
                    mix(&alone, sizeof alone);
                    mix(rows.data(), rows.size() * sizeof(T));
                }
    }
    return hash;
}
int main() { std::printf("%016llx %016llx\n", (unsigned long long)run<float>(), (unsigned long long)run<double>()); }
