#include "train/recovery.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <iterator>
#include <map>
#include <optional>
#include <set>

#include "core/fs.h"

namespace sn::train {
namespace fs = std::filesystem;

namespace {

// The step of a mirrored checkpoint file "step-<12 digits>.…" (none for other names).
std::optional<int64_t> checkpoint_file_step(const fs::path& path) {
  const std::string name = path.filename().string();
  if (name.size() < 18 || !name.starts_with("step-")) return std::nullopt;
  try {
    return std::stoll(name.substr(5, 12));
  } catch (...) {
    return std::nullopt;
  }
}

}  // namespace

CheckpointMirror::CheckpointMirror(fs::path job_dir, int64_t stages, int64_t replicas)
    : dir_(std::move(job_dir) / "checkpoints"), stages_(stages), replicas_(replicas) {}

fs::path CheckpointMirror::role_dir(int64_t stage, int64_t replica) const {
  return dir_ / fmt::format("stage{}-replica{}", stage, replica);
}

Status CheckpointMirror::store(int64_t stage, int64_t replica, int64_t step,
                               const std::vector<solvernet::v1::CheckpointBlob>& files) {
  CheckpointStore store(role_dir(stage, replica), 1);
  const std::string manifest = store.manifest_path(step).filename().string();
  const std::string stem = fmt::format("step-{:012d}.", step);
  if (files.empty() || files.back().name() != manifest)
    return kind_error(ErrorKind::bad_peer, "the checkpoint of step {} came without its manifest last", step);
  SN_TRY(ensure_directory(store.dir()));
  for (const auto& f : files) {
    // Names come from the node: only files of this step, inside this directory.
    if (!f.name().starts_with(stem) || f.name().find('/') != std::string::npos)
      return kind_error(ErrorKind::bad_peer, "the checkpoint of step {} holds a file named \"{}\"", step, f.name());
    SN_TRY(write_file_atomic(store.dir() / f.name(), f.data()));
  }
  if (auto loaded = store.load(step); !loaded.ok()) {
    std::error_code ec;
    fs::remove(store.manifest_path(step), ec);
    return kind_error(ErrorKind::bad_peer, "the checkpoint of stage {} replica {} at step {} does not hold: {}", stage,
                      replica, step, loaded.message());
  }
  return ok_status();
}

int64_t CheckpointMirror::newest_common_step() const {
  std::set<int64_t> common;
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = 0; r < replicas_; ++r) {
      auto steps = CheckpointStore(role_dir(s, r), 1).steps();
      std::set<int64_t> here(steps.begin(), steps.end());
      if (s == 0 && r == 0) {
        common = here;
      } else {
        std::set<int64_t> both;
        std::set_intersection(common.begin(), common.end(), here.begin(), here.end(), std::inserter(both, both.end()));
        common = std::move(both);
      }
    }
  return common.empty() ? 0 : *common.rbegin();
}

Result<std::vector<solvernet::v1::CheckpointBlob>> CheckpointMirror::files(int64_t stage, int64_t replica,
                                                                          int64_t step) const {
  CheckpointStore store(role_dir(stage, replica), 1);
  SN_ASSIGN(auto loaded, store.load(step));  // checks every file against the manifest first
  std::vector<solvernet::v1::CheckpointBlob> out;
  for (const auto& file : loaded.manifest.files) {
    SN_ASSIGN(std::string bytes, read_file(store.dir() / file.name));
    out.emplace_back();
    out.back().set_name(file.name);
    out.back().set_data(std::move(bytes));
  }
  SN_ASSIGN(std::string manifest, read_file(store.manifest_path(step)));
  out.emplace_back();
  out.back().set_name(store.manifest_path(step).filename().string());
  out.back().set_data(std::move(manifest));
  return out;
}

Result<CheckpointManifest> CheckpointMirror::manifest(int64_t stage, int64_t replica, int64_t step) const {
  SN_ASSIGN(auto loaded, CheckpointStore(role_dir(stage, replica), 1).load(step));
  return std::move(loaded.manifest);
}

void CheckpointMirror::prune_before(int64_t step) const {
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = 0; r < replicas_; ++r) {
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(role_dir(s, r), ec)) {
        // step-<12 digits>.…: older steps go, manifest first (so none is left half complete).
        const auto file_step = checkpoint_file_step(entry.path());
        if (file_step && *file_step < step && entry.path().filename().string().ends_with(".manifest.json"))
          fs::remove(entry.path(), ec);
      }
      for (const auto& entry : fs::directory_iterator(role_dir(s, r), ec)) {
        const auto file_step = checkpoint_file_step(entry.path());
        if (file_step && *file_step < step) fs::remove(entry.path(), ec);
      }
    }
}

Status CheckpointMirror::renumber_replicas(const std::vector<int64_t>& kept) {
  for (int64_t s = 0; s < stages_; ++s) {
    for (int64_t r = 0; r < replicas_; ++r) {
      if (std::find(kept.begin(), kept.end(), r) != kept.end()) continue;
      std::error_code ec;
      fs::remove_all(role_dir(s, r), ec);
      if (ec) return make_error("cannot delete {}: {}", role_dir(s, r).string(), ec.message());
    }
    // Ascending, so each target is free: it was deleted above or already moved down.
    for (size_t to = 0; to < kept.size(); ++to) {
      const auto from = kept[to];
      if (from == static_cast<int64_t>(to) || !fs::exists(role_dir(s, from))) continue;
      std::error_code ec;
      fs::rename(role_dir(s, from), role_dir(s, static_cast<int64_t>(to)), ec);
      if (ec)
        return make_error("cannot move {} to {}: {}", role_dir(s, from).string(),
                          role_dir(s, static_cast<int64_t>(to)).string(), ec.message());
    }
  }
  replicas_ = static_cast<int64_t>(kept.size());
  return ok_status();
}

Status CheckpointMirror::add_replicas(int64_t replicas) {
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = replicas_; r < replicas; ++r) {
      std::error_code ec;
      fs::remove_all(role_dir(s, r), ec);
      fs::copy(role_dir(s, 0), role_dir(s, r), fs::copy_options::recursive, ec);
      if (ec) return make_error("cannot copy {} to {}: {}", role_dir(s, 0).string(), role_dir(s, r).string(), ec.message());
    }
  replicas_ = replicas;
  return ok_status();
}

Status write_job_file(const fs::path& job_dir, const JobConfig& job) {
  SN_TRY(ensure_directory(job_dir));
  return write_file_atomic(job_dir / "job.toml", job_to_toml(job));
}

Status write_job_state(const fs::path& job_dir, const JobDirState& state) {
  nlohmann::json j;
  j["job_id"] = state.job_id;
  j["checkpoint_step"] = state.checkpoint_step;
  j["losses"] = state.losses;
  j["finished"] = state.finished;
  SN_TRY(ensure_directory(job_dir));
  return write_file_atomic(job_dir / "state.json", j.dump(2) + "\n");
}

Result<JobDirState> read_job_dir(const fs::path& job_dir, const JobConfig& job) {
  auto text = read_file(job_dir / "state.json");
  if (!text.ok()) return input_error("{}: not a job dir (no state.json)", job_dir.string());
  JobDirState state;
  try {
    auto j = nlohmann::json::parse(*text);
    state.job_id = j.at("job_id").get<std::string>();
    state.checkpoint_step = j.at("checkpoint_step").get<int64_t>();
    state.losses = j.at("losses").get<std::vector<double>>();
    state.finished = j.value("finished", "");
  } catch (const std::exception& e) {
    return input_error("{}: unreadable ({})", (job_dir / "state.json").string(), e.what());
  }
  if (state.checkpoint_step < 0 || static_cast<int64_t>(state.losses.size()) < state.checkpoint_step)
    return input_error("{}: checkpoint_step {} with {} losses", (job_dir / "state.json").string(),
                       state.checkpoint_step, state.losses.size());
  state.losses.resize(static_cast<size_t>(state.checkpoint_step));
  CheckpointMirror mirror(job_dir, job.parallel.stages, job.parallel.replicas);
  if (state.checkpoint_step > 0)
    for (int64_t s = 0; s < job.parallel.stages; ++s)
      for (int64_t r = 0; r < job.parallel.replicas; ++r)
        if (auto loaded = CheckpointStore(mirror.role_dir(s, r), 1).load(state.checkpoint_step); !loaded.ok())
          return input_error("{}: the checkpoint of stage {} replica {} at step {} is not usable: {}",
                             job_dir.string(), s, r, state.checkpoint_step, loaded.message());
  return state;
}

std::string resume_advice(const fs::path& job_dir, int64_t step) {
  if (step <= 0)
    return fmt::format("no checkpoint was mirrored yet (set train.checkpoint_every); the job dir is {}",
                       job_dir.string());
  return fmt::format("the job stopped at its checkpoint of step {} in {}; continue it with: solvernet train --resume {} "
                     "--bootstrap HOST:PORT",
                     step, (job_dir / "checkpoints").string(), job_dir.string());
}

std::optional<ReplicaDisagreement> replica_disagreement(const std::vector<std::string>& names,
                                                        const std::vector<std::string>& hashes, int64_t stage,
                                                        const std::string& when) {
  std::map<std::string, std::vector<size_t>> by_hash;
  for (size_t k = 0; k < hashes.size(); ++k) by_hash[hashes[k]].push_back(k);
  if (by_hash.size() <= 1) return std::nullopt;
  const auto largest = std::max_element(by_hash.begin(), by_hash.end(), [](const auto& a, const auto& b) {
    return a.second.size() < b.second.size();
  });
  ReplicaDisagreement out;
  if (2 * largest->second.size() > hashes.size()) {
    std::vector<std::string> who;
    for (size_t k = 0; k < hashes.size(); ++k)
      if (hashes[k] != largest->first) {
        out.blamed.push_back(k);
        who.push_back(names[k]);
      }
    out.message = fmt::format("{} diverged from the other replicas of stage {} ({} of {} agree) {}",
                              fmt::join(who, " and "), stage, largest->second.size(), hashes.size(), when);
  } else {
    out.message = fmt::format("the replicas of stage {} disagree {}: {} (no majority, so none of them can be "
                              "blamed)", stage, when, fmt::join(names, ", "));
  }
  return out;
}

}  // namespace sn::train
