#pragma once

// A teacher cached sparsely: for each row, K slots of a class index and the natural log of the teacher's
// probability of that class at the loss's temperature, -inf marking an empty slot (whose index is ignored).
// What the listed probabilities leave of 1 is the tail, the mass of the classes not listed. The loss takes one
// wherever it takes dense teacher logits (DistillationLoss<T>), and Tail says what it does with the tail.
//
// The slots are read as they lie in the caller's memory, whatever their types (int32 or int64 indices; float16,
// float32 or float64 log-probabilities: a cache on disk is often half precision), a row's K slots contiguous.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include "kdloss/messages.hpp"

namespace kdloss {

// What the loss matches the teacher's tail against (see DistillationLoss's sparse overloads).
enum class Tail {
    bucket,       // one more class: KL over the K listed classes and the bin of all others
    renormalize,  // the listed probabilities scaled to sum to 1 (classic top-k distillation)
};

inline constexpr const char* tail_names[] = {"bucket", "renormalize"};

inline Tail parse_tail(std::string_view name) {
    if (name == tail_names[0]) return Tail::bucket;
    if (name == tail_names[1]) return Tail::renormalize;
    throw std::invalid_argument("tail must be one of 'bucket', 'renormalize', got '" + std::string(name) + "'");
}

inline const char* tail_name(Tail tail) noexcept { return tail == Tail::renormalize ? tail_names[1] : tail_names[0]; }

// IEEE half precision, as its bits (C++17 has no type for it).
struct Float16 {
    std::uint16_t bits;
};

// A half's value, exactly (every half is a double).
inline double to_double(Float16 half) noexcept {
    const int sign = half.bits >> 15, exponent = (half.bits >> 10) & 0x1f, mantissa = half.bits & 0x3ff;
    double magnitude;
    if (exponent == 0x1f) {
        magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
    } else if (exponent == 0) {
        magnitude = std::ldexp(static_cast<double>(mantissa), -24);  // subnormal
    } else {
        magnitude = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
    }
    return sign ? -magnitude : magnitude;
}

// The slots of `rows` rows, K each: row i's indices from indices + i * index_row_stride, its log-probabilities
// from logprobs + i * logprob_row_stride (strides in elements), each row's K contiguous.
class SparseTeacherView {
public:
    enum class IndexType : unsigned char { int32, int64 };
    enum class LogProbType : unsigned char { float16, float32, float64 };

    constexpr SparseTeacherView() noexcept = default;

    template <class Index, class LogProb>
    SparseTeacherView(const Index* indices, std::ptrdiff_t index_row_stride, const LogProb* logprobs,
                      std::ptrdiff_t logprob_row_stride, std::size_t rows, std::size_t k) noexcept
        : indices_(indices),
          logprobs_(logprobs),
          rows_(rows),
          k_(k),
          index_row_stride_(index_row_stride),
          logprob_row_stride_(logprob_row_stride),
          index_type_(index_type<Index>()),
          logprob_type_(logprob_type<LogProb>()) {}

    // Contiguous rows: (rows, k) arrays in row-major order.
    template <class Index, class LogProb>
    SparseTeacherView(const Index* indices, const LogProb* logprobs, std::size_t rows, std::size_t k) noexcept
        : SparseTeacherView(indices, static_cast<std::ptrdiff_t>(k), logprobs, static_cast<std::ptrdiff_t>(k), rows,
                            k) {}

    std::size_t rows() const noexcept { return rows_; }
    std::size_t k() const noexcept { return k_; }
    IndexType index_type() const noexcept { return index_type_; }
    LogProbType logprob_type() const noexcept { return logprob_type_; }
    const void* indices_data() const noexcept { return indices_; }
    const void* logprobs_data() const noexcept { return logprobs_; }
    std::ptrdiff_t index_row_stride() const noexcept { return index_row_stride_; }
    std::ptrdiff_t logprob_row_stride() const noexcept { return logprob_row_stride_; }
    std::size_t index_bytes() const noexcept { return index_type_ == IndexType::int32 ? 4 : 8; }
    std::size_t logprob_bytes() const noexcept {
        return logprob_type_ == LogProbType::float16 ? 2 : logprob_type_ == LogProbType::float32 ? 4 : 8;
    }

    std::int64_t index(std::size_t row, std::size_t slot) const noexcept {
        const std::ptrdiff_t at =
            static_cast<std::ptrdiff_t>(row) * index_row_stride_ + static_cast<std::ptrdiff_t>(slot);
        if (index_type_ == IndexType::int32) return static_cast<const std::int32_t*>(indices_)[at];
        return static_cast<const std::int64_t*>(indices_)[at];
    }

    double logprob(std::size_t row, std::size_t slot) const noexcept {
        const std::ptrdiff_t at =
            static_cast<std::ptrdiff_t>(row) * logprob_row_stride_ + static_cast<std::ptrdiff_t>(slot);
        switch (logprob_type_) {
            case LogProbType::float16: return to_double(static_cast<const Float16*>(logprobs_)[at]);
            case LogProbType::float32: return static_cast<const float*>(logprobs_)[at];
            case LogProbType::float64: break;
        }
        return static_cast<const double*>(logprobs_)[at];
    }

    // How messages name a row: by default (i,) for row i; a host whose rows are the flattened leading axes of an
    // N-D array gives their shape, and a row is named by its index there, e.g. (3, 17).
    void set_leading_shape(const std::size_t* shape, std::size_t ndim) noexcept {
        leading_shape_ = shape;
        leading_ndim_ = ndim;
        named_by_shape_ = true;
    }

    std::string row_name(std::size_t row) const {
        return named_by_shape_ ? detail::format_row(row, leading_shape_, leading_ndim_) : detail::format_row(row);
    }

private:
    template <class Index>
    static constexpr IndexType index_type() noexcept {
        static_assert(std::is_same_v<Index, std::int32_t> || std::is_same_v<Index, std::int64_t>,
                      "sparse teacher indices are int32 or int64");
        return std::is_same_v<Index, std::int32_t> ? IndexType::int32 : IndexType::int64;
    }
    template <class LogProb>
    static constexpr LogProbType logprob_type() noexcept {
        static_assert(
            std::is_same_v<LogProb, Float16> || std::is_same_v<LogProb, float> || std::is_same_v<LogProb, double>,
            "sparse teacher log-probabilities are Float16, float or double");
        return std::is_same_v<LogProb, Float16> ? LogProbType::float16
               : std::is_same_v<LogProb, float> ? LogProbType::float32
                                                : LogProbType::float64;
    }

    const void* indices_ = nullptr;
    const void* logprobs_ = nullptr;
    std::size_t rows_ = 0, k_ = 0;
    std::ptrdiff_t index_row_stride_ = 0, logprob_row_stride_ = 0;
    IndexType index_type_ = IndexType::int64;
    LogProbType logprob_type_ = LogProbType::float32;
    const std::size_t* leading_shape_ = nullptr;
    std::size_t leading_ndim_ = 0;
    bool named_by_shape_ = false;
};

}  // namespace kdloss
