#pragma once

// The whole public C++ API of kdloss: include this one header.

#include "kdloss/distillation_loss.hpp"
#include "kdloss/isa.hpp"
#include "kdloss/teacher_cache.hpp"
#include "kdloss/version.hpp"
#include "kdloss/views.hpp"
