// Precompiled header for the modules that use tensors.
#pragma once
#include <torch/torch.h>
