#include "train/inputs.h"

#include <fmt/ranges.h>

#include "core/fs.h"
#include "model/safetensors.h"
#include "train/train.h"

namespace sn::train {

Result<std::map<std::string, torch::Tensor>> load_initial_weights(const JobConfig& job,
                                                                  const std::filesystem::path& path) {
  SN_TRY(check_input_file(path, "--init"));
  SN_ASSIGN(auto loaded, model::load_safetensors(path));
  std::map<std::string, torch::Tensor> by_name(loaded.begin(), loaded.end());
  // The whole model's parameters are every stage's, whatever the split.
  const model::StageModel whole(job.model, 0, static_cast<int>(job.model.layers), job.train.seed);
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, expected] : whole.named_parameters()) {
    auto it = by_name.find(name);
    if (it == by_name.end())
      return input_error("{}: lacks tensor {} (shape [{}]) of the job's model", path.string(), name,
                         fmt::join(expected.sizes(), ", "));
    const torch::Tensor& t = it->second;
    if (!t.sizes().equals(expected.sizes()))
      return input_error("{}: tensor {} has shape [{}], the job's model needs [{}]", path.string(), name,
                         fmt::join(t.sizes(), ", "), fmt::join(expected.sizes(), ", "));
    if (!t.is_floating_point())
      return input_error("{}: tensor {} holds {}, not floating-point weights", path.string(), name,
                         c10::toString(t.scalar_type()));
    // NaN or infinite weights would train into NaN losses without a word.
    if (t.numel() > 0 && !torch::isfinite(t).all().item<bool>())
      return input_error("{}: tensor {} holds NaN or infinite values", path.string(), name);
    out.emplace(name, t.to(expected.scalar_type()));
  }
  return out;
}

Result<std::vector<std::string>> initial_weights_by_stage(const JobConfig& job, const std::filesystem::path& path) {
  SN_ASSIGN(auto by_name, load_initial_weights(job, path));
  const auto ranges = stage_layer_ranges(job.model.layers, job.parallel.stages);
  std::vector<std::string> out;
  for (const auto& [first, count] : ranges) {
    const model::StageModel shape_only(job.model, first, count, job.train.seed);
    model::NamedTensors mine;
    for (const auto& [name, p] : shape_only.named_parameters()) mine.emplace_back(name, by_name.at(name));
    out.push_back(model::safetensors_bytes(mine, {}));
  }
  return out;
}

}  // namespace sn::train
