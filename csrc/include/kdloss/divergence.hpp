#pragma once

// Which divergence D(p, q) the soft term T^2 D measures, between the teacher's p = softmax(t/T) and the
// student's q = softmax(s/T). The mixtures take a parameter of the loss: beta for jsd, skew for the skew ones.

#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>

namespace kdloss {

enum class Divergence {
    forward_kl,       // KL(p || q): Hinton's, mean-seeking
    reverse_kl,       // KL(q || p): MiniLLM's, mode-seeking
    jsd,              // beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q: GKD's generalized
                      // Jensen-Shannon (TRL's); beta = 0 is KL(p || q) and beta = 1 KL(q || p), as in TRL
    skew_forward_kl,  // KL(p || skew p + (1 - skew) q): DistiLLM's; skew = 0 is KL(p || q)
    skew_reverse_kl,  // KL(q || skew q + (1 - skew) p): DistiLLM's; skew = 0 is KL(q || p)
};

// The names, in the order of the enumerators: what Python passes and what messages list.
inline constexpr const char* divergence_names[] = {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                                   "skew_reverse_kl"};
inline constexpr std::size_t divergence_count = sizeof(divergence_names) / sizeof(divergence_names[0]);

inline Divergence parse_divergence(std::string_view name) {
    for (std::size_t i = 0; i < divergence_count; ++i)
        if (name == divergence_names[i]) return static_cast<Divergence>(i);
    std::string message = "divergence must be one of ";
    for (std::size_t i = 0; i < divergence_count; ++i) {
        message += i == 0 ? "'" : ", '";
        message += divergence_names[i];
        message += '\'';
    }
    message += ", got '";
    message += name;
    message += '\'';
    throw std::invalid_argument(message);
}

inline const char* divergence_name(Divergence divergence) noexcept {
    const auto index = static_cast<std::size_t>(divergence);
    return index < divergence_count ? divergence_names[index] : divergence_names[0];
}

}  // namespace kdloss
