// Checks of the client's input files, run before any node is contacted or any
// step trained, so a bad file costs a one-line error and nothing else.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/job.h"
#include "core/result.h"
#include "model/gpt.h"

namespace sn::train {

// The starting weights in PATH for JOB's model, checked whole: a safetensors file
// (not a zip/pickle, not empty or truncated) holding every tensor of the model with
// its exact shape, a floating-point dtype and finite values. Extra tensors are
// ignored. Errors (exit 2) name the file and the tensor, e.g. "w.safetensors: tensor
// blocks.0.attn.qkv.weight has shape [96, 32], the job's model needs [192, 64]".
Result<std::map<std::string, torch::Tensor>> load_initial_weights(const JobConfig& job,
                                                                  const std::filesystem::path& path);

// The same weights cut into STAGES (layer ranges of stage_layer_ranges): for each
// stage the safetensors bytes of its own tensors, as SetupJob carries them.
Result<std::vector<std::string>> initial_weights_by_stage(const JobConfig& job, const std::filesystem::path& path);

}  // namespace sn::train
