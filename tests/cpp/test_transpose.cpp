// The block layout's transpositions (kdloss/detail/transpose.hpp), on their own: every row length around
// the tile widths, every count of live rows, strided rows, and the row maxima found on the way. Whichever
// way this build transposes (vector shuffles or tiles through an array), values must land exactly where they
// belong and nowhere else.

#include <algorithm>
#include <cstddef>
#include <vector>

#include "kdloss/detail/transpose.hpp"
#include "kdtest.hpp"

namespace test_transpose {

using kdloss::detail::lanes;
using kdloss::detail::lanes_to_rows;
using kdloss::detail::rows_to_lanes;

template <class T>
void round_trip(std::size_t n, std::size_t count) {
    const std::size_t stride = n + 3;  // rows that are not contiguous with each other
    std::vector<T> source(lanes * stride);
    for (std::size_t k = 0; k < source.size(); ++k) source[k] = static_cast<T>((k * 7919) % 1009) + T(0.5);
    const T* rows[lanes];
    for (std::size_t lane = 0; lane < lanes; ++lane) rows[lane] = source.data() + lane * stride;

    std::vector<T> block(lanes * n, T(-1));
    const kdloss::detail::Pack<T> maxima = rows_to_lanes(rows, n, block.data());
    for (std::size_t c = 0; c < n; ++c)
        for (std::size_t lane = 0; lane < lanes; ++lane) KD_CHECK_EQ(block[c * lanes + lane], rows[lane][c]);
    for (std::size_t lane = 0; lane < lanes; ++lane)
        KD_CHECK_EQ(maxima[lane], *std::max_element(rows[lane], rows[lane] + n));

    const T untouched = T(-7);
    std::vector<T> destination(lanes * stride, untouched);
    T* out[lanes];
    for (std::size_t lane = 0; lane < lanes; ++lane) out[lane] = destination.data() + lane * stride;
    lanes_to_rows(block.data(), n, out, count);
    for (std::size_t lane = 0; lane < lanes; ++lane)
        for (std::size_t c = 0; c < stride; ++c) {
            const bool written = lane < count && c < n;
            KD_CHECK_EQ(out[lane][c], written ? rows[lane][c] : untouched);
        }
}

KD_TEST(transpositions_put_every_value_in_its_place) {
    for (std::size_t n = 1; n <= 3 * lanes + 1; ++n)
        for (std::size_t count = 1; count <= lanes; ++count) {
            round_trip<float>(n, count);
            round_trip<double>(n, count);
        }
}

}  // namespace test_transpose
