#include <algorithm>

#include "train/train.h"

namespace sn::train {
namespace {
constexpr std::pair<Cheat::Strategy, const char*> kNames[] = {
    {Cheat::Strategy::none, "none"},
    {Cheat::Strategy::skip_steps, "skip-steps"},
    {Cheat::Strategy::less_data, "less-data"},
    {Cheat::Strategy::perturb, "perturb"},
    {Cheat::Strategy::random_weights, "random-weights"},
    {Cheat::Strategy::lie_in_leaf, "lie-in-leaf"},
    {Cheat::Strategy::wrong_op, "wrong-op"},
    {Cheat::Strategy::equivocate, "equivocate"},
    {Cheat::Strategy::withhold, "withhold"},
};
}  // namespace

int64_t Cheat::first_step(int64_t steps) const {
  if (from_step > 0) return from_step;
  return std::max<int64_t>(1, steps * 3 / 4);
}

const char* cheat_name(Cheat::Strategy strategy) {
  for (const auto& [s, name] : kNames)
    if (s == strategy) return name;
  return "?";
}

Result<Cheat::Strategy> parse_cheat_strategy(std::string_view name) {
  std::string valid;
  for (const auto& [s, n] : kNames) {
    if (n == name) return s;
    if (s != Cheat::Strategy::none) valid += (valid.empty() ? "" : ", ") + std::string(n);
  }
  return input_error("unknown cheat \"{}\"; valid: {}", name, valid);
}

}  // namespace sn::train
