#pragma once

// The single source of kdloss's version: CMake, the Python package metadata (scikit-build-core's regex
// provider) and kdloss.__version__ all read these three lines.
#define KDLOSS_VERSION_MAJOR 0
#define KDLOSS_VERSION_MINOR 1
#define KDLOSS_VERSION_PATCH 0

#define KDLOSS_STRINGIFY_IMPL(x) #x
#define KDLOSS_STRINGIFY(x) KDLOSS_STRINGIFY_IMPL(x)
#define KDLOSS_VERSION_STRING              \
    KDLOSS_STRINGIFY(KDLOSS_VERSION_MAJOR) \
    "." KDLOSS_STRINGIFY(KDLOSS_VERSION_MINOR) "." KDLOSS_STRINGIFY(KDLOSS_VERSION_PATCH)

namespace kdloss {
inline constexpr const char* version = KDLOSS_VERSION_STRING;
}  // namespace kdloss
