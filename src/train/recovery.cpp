#include "train/recovery.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <climits>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "core/fs.h"
#include "core/hash.h"
#include "model/data.h"
#include "model/gpt.h"
#include "net/rpc.h"
#include "train/control.h"
#include "train/json_fields.h"

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

// A decimal number, the whole of TEXT (nullopt: anything else, or above 2^31).
std::optional<int64_t> whole_number(std::string_view text) {
  int64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size() || value < 0 || value > INT32_MAX)
    return std::nullopt;
  return value;
}

// The roles with a complete checkpoint of STEP in MIRROR's directory, as the
// grid they span: (stages, replicas), from the highest of each present.
std::pair<int64_t, int64_t> checkpointed_roles(const CheckpointMirror& mirror, int64_t step) {
  int64_t stages = 0, replicas = 0;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(mirror.role_dir(0, 0).parent_path(), ec)) {
    // stage<s>-replica<r>, exactly as role_dir names it.
    const std::string name = entry.path().filename().string();
    const auto dash = name.find("-replica");
    if (!name.starts_with("stage") || dash == std::string::npos) continue;
    const auto s = whole_number(std::string_view(name).substr(5, dash - 5));
    const auto r = whole_number(std::string_view(name).substr(dash + 8));
    if (!s || !r || name != mirror.role_dir(*s, *r).filename()) continue;
    if (!fs::exists(CheckpointStore(entry.path(), 1).manifest_path(step))) continue;
    stages = std::max(stages, *s + 1);
    replicas = std::max(replicas, *r + 1);
  }
  return {stages, replicas};
}

// The steps of which some role in MIRROR's directory has a complete checkpoint, ascending.
std::set<int64_t> checkpointed_steps(const CheckpointMirror& mirror) {
  std::set<int64_t> steps;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(mirror.role_dir(0, 0).parent_path(), ec))
    if (entry.is_directory(ec))
      for (int64_t step : CheckpointStore(entry.path(), 1).steps()) steps.insert(step);
  return steps;
}

// How LOADED (a checkpoint of stage S) is not of JOB, or nullopt. The labels
// name the role that saved it: after a re-plan the files of a renumbered
// replica keep their old label and seeds.
std::optional<std::string> differs_from_job(const LoadedCheckpoint& loaded, const model::StageModel& stage,
                                            const JobConfig& job, int64_t s, const std::string& job_id) {
  std::map<std::string, const torch::Tensor*> held;
  for (const auto& [name, tensor] : loaded.tensors) held[name] = &tensor;
  std::set<std::string> parameters;
  for (const auto& [name, expected] : stage.named_parameters()) {
    parameters.insert(name);
    const auto it = held.find(name);
    if (it == held.end())
      return fmt::format("lacks tensor {} (shape [{}]) of job.toml's model", name, fmt::join(expected.sizes(), ", "));
    if (!it->second->sizes().equals(expected.sizes()))
      return fmt::format("holds tensor {} of shape [{}], job.toml's model needs [{}]", name,
                         fmt::join(it->second->sizes(), ", "), fmt::join(expected.sizes(), ", "));
  }
  // A parameter of a layer the job no longer has (fewer layers, another split).
  for (const auto& [name, tensor] : loaded.tensors)
    if (name.starts_with("adam.m.") && !parameters.count(name.substr(7)))
      return fmt::format("holds parameter {}, which job.toml's model for stage {} lacks", name.substr(7), s);
  const auto label = [&](const std::string& key) {
    const auto it = loaded.manifest.labels.find(key);
    return it == loaded.manifest.labels.end() ? std::string() : it->second;
  };
  if (!label("job_id").empty() && label("job_id") != job_id)
    return fmt::format("is of job {}, not {}", label("job_id"), job_id);
  if (const auto saved_replica = whole_number(label("replica"))) {
    TrainingState seeds;
    seeds.rng = RngState{job.train.seed, s, *saved_replica};
    const auto rng = static_cast<size_t>(StatePart::rng);
    if (training_state_digest(seeds).parts[rng] != loaded.manifest.state.parts[rng])
      return fmt::format("was not trained with job.toml's train.seed = {}", job.train.seed);
  }
  return std::nullopt;
}

// "section.key" → value of each "key = value" line of a job_to_toml text.
std::map<std::string, std::string> toml_fields(const std::string& toml) {
  std::map<std::string, std::string> out;
  std::string section, line;
  std::istringstream lines(toml);
  while (std::getline(lines, line)) {
    if (line.starts_with("[") && line.ends_with("]")) {
      section = line.substr(1, line.size() - 2) + ".";
    } else if (const auto eq = line.find(" = "); eq != std::string::npos) {
      std::string value = line.substr(eq + 3);
      // Reals are written with 17 digits: show the shortest that reads back the same (0.003).
      double real = 0;
      if (auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), real);
          ec == std::errc() && end == value.data() + value.size())
        value = fmt::format("{}", real);
      out[section + line.substr(0, eq)] = value;
    }
  }
  return out;
}

// The fields of job_to_toml text NOW that differ from WAS, as (key, "train.lr = 0.5 (was 0.003)").
std::vector<std::pair<std::string, std::string>> changed_fields(const std::string& was, const std::string& now) {
  const auto before = toml_fields(was);
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [key, value] : toml_fields(now)) {
    const auto it = before.find(key);
    if (it == before.end() || it->second != value)
      out.emplace_back(key, fmt::format("{} = {} (was {})", key, value, it == before.end() ? "unset" : it->second));
  }
  return out;
}

}  // namespace

bool CheckpointMirror::is_layout_name(const std::string& name) {
  if (name == kFirstLayout) return true;
  const std::string prefix = std::string(kFirstLayout) + "-";
  return name.starts_with(prefix) && name.size() > prefix.size() && name[prefix.size()] != '0' &&
         whole_number(std::string_view(name).substr(prefix.size())).has_value();
}

CheckpointMirror::CheckpointMirror(fs::path job_dir, int64_t stages, int64_t replicas, std::string layout)
    : job_dir_(std::move(job_dir)),
      layout_(std::move(layout)),
      dir_(job_dir_ / layout_),
      stages_(stages),
      replicas_(replicas) {}

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
    // A failed write (the job dir's disk full) leaves no file of this step:
    // state.json moves to a step only once it is stored for every role.
    if (auto written = write_file_atomic(store.dir() / f.name(), f.data()); !written.ok()) {
      store.remove_step(step);
      return written;
    }
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

void CheckpointMirror::prune_if(const std::function<bool(int64_t)>& gone) const {
  for (int64_t s = 0; s < stages_; ++s)
    for (int64_t r = 0; r < replicas_; ++r) {
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(role_dir(s, r), ec)) {
        // step-<12 digits>.…: manifest first (so none is left half complete).
        const auto file_step = checkpoint_file_step(entry.path());
        if (file_step && gone(*file_step) && entry.path().filename().string().ends_with(".manifest.json"))
          fs::remove(entry.path(), ec);
      }
      for (const auto& entry : fs::directory_iterator(role_dir(s, r), ec)) {
        const auto file_step = checkpoint_file_step(entry.path());
        if (file_step && gone(*file_step)) fs::remove(entry.path(), ec);
      }
    }
}

void CheckpointMirror::prune_before(int64_t step) const {
  prune_if([step](int64_t s) { return s < step; });
}

void CheckpointMirror::prune_all_but(int64_t step) const {
  prune_if([step](int64_t s) { return s != step; });
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(job_dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (name != layout_ && is_layout_name(name)) fs::remove_all(entry.path(), ec);
  }
}

Status CheckpointMirror::renumber_replicas(const std::vector<int64_t>& kept) { return relayout(kept); }

Status CheckpointMirror::add_replicas(int64_t replicas) {
  std::vector<int64_t> source;
  for (int64_t r = 0; r < replicas; ++r) source.push_back(r < replicas_ ? r : 0);
  return relayout(source);
}

Status CheckpointMirror::relayout(const std::vector<int64_t>& source) {
  const std::string prefix = std::string(kFirstLayout) + "-";
  const int64_t generation = layout_ == kFirstLayout ? 1 : *whole_number(layout_.substr(prefix.size())) + 1;
  const std::string next = prefix + std::to_string(generation);
  const fs::path next_dir = job_dir_ / next;
  std::error_code ec;
  fs::remove_all(next_dir, ec);  // a layout a killed client was building: state.json never named it
  if (ec) return make_error("cannot delete {}: {}", next_dir.string(), ec.message());
  // Files are never written in place (write_file_atomic renames a new one
  // over), so a hard link shares nothing that changes later; the new layout
  // costs no copy of the checkpoints.
  for (int64_t s = 0; s < stages_; ++s)
    for (size_t r = 0; r < source.size(); ++r) {
      const fs::path from = role_dir(s, source[r]);
      const fs::path to = next_dir / fmt::format("stage{}-replica{}", s, r);
      SN_TRY(ensure_directory(to));
      if (!fs::exists(from, ec)) continue;  // nothing mirrored for the role yet
      for (const auto& entry : fs::directory_iterator(from, ec)) {
        if (!entry.is_regular_file(ec)) continue;
        const fs::path target = to / entry.path().filename();
        fs::create_hard_link(entry.path(), target, ec);
        if (ec) fs::copy_file(entry.path(), target, fs::copy_options::overwrite_existing, ec);
        if (ec) return make_error("cannot copy {} to {}: {}", entry.path().string(), target.string(), ec.message());
      }
      if (ec) return make_error("cannot read {}: {}", from.string(), ec.message());
      SN_TRY(sync_directory(to));
    }
  SN_TRY(sync_directory(next_dir));
  SN_TRY(sync_directory(job_dir_));
  retired_ = dir_;
  layout_ = next;
  dir_ = next_dir;
  replicas_ = static_cast<int64_t>(source.size());
  return ok_status();
}

void CheckpointMirror::remove_retired_layout() {
  if (retired_.empty()) return;
  std::error_code ec;
  fs::remove_all(retired_, ec);
  retired_.clear();
}

Status write_job_file(const fs::path& job_dir, const JobConfig& job) {
  SN_TRY(ensure_directory(job_dir));
  return write_file_atomic(job_dir / "job.toml", job_to_toml(job));
}

namespace {

// Per field of state.json: BLAKE2b-256 of its name and its JSON text, so that
// a field edited, added or removed by hand is named when --resume refuses it.
nlohmann::json field_digests(const nlohmann::json& fields) {
  nlohmann::json out = nlohmann::json::object();
  for (const auto& [name, value] : fields.items())
    out[name] = to_hex(hash_string(fmt::format("solvernet/job-state/v1/{}={}", name, value.dump())));
  return out;
}

constexpr const char* kDigestsField = "digests";

// The first field of J (a parsed state.json) whose digest is not the one
// recorded beside it in J["digests"] ("digests" itself if absent), or nullopt.
std::optional<std::string> edited_field(nlohmann::json j) {
  if (!j.contains(kDigestsField) || !j[kDigestsField].is_object()) return std::string(kDigestsField);
  const nlohmann::json recorded = j[kDigestsField];
  j.erase(kDigestsField);
  const nlohmann::json now = field_digests(j);
  for (const auto& [name, digest] : now.items())
    if (!recorded.contains(name) || recorded[name] != digest) return name;
  for (const auto& [name, digest] : recorded.items())
    if (!now.contains(name)) return name;
  return std::nullopt;
}

}  // namespace

Status write_job_state(const fs::path& job_dir, const JobDirState& state) {
  nlohmann::json j;
  j["job_id"] = state.job_id;
  j["checkpoint_step"] = state.checkpoint_step;
  j["losses"] = state.losses;
  j["finished"] = state.finished;
  if (!state.job_toml.empty()) j["job_toml"] = state.job_toml;
  if (state.replanned) j["replanned"] = true;
  if (state.planned_replicas > 0) j["planned_replicas"] = state.planned_replicas;
  if (state.replicas > 0) j["replicas"] = state.replicas;
  j["layout"] = state.layout;
  j[kDigestsField] = field_digests(j);
  SN_TRY(ensure_directory(job_dir));
  return write_file_atomic(job_dir / "state.json", j.dump(2) + "\n");
}

Result<JobDirState> read_job_dir(const fs::path& job_dir, const JobConfig& job) {
  const fs::path file = job_dir / "state.json";
  auto text = read_file(file);
  if (!text.ok()) return input_error("{}: not a job dir (no state.json)", job_dir.string());
  const auto j = nlohmann::json::parse(*text, nullptr, false);
  if (j.is_discarded()) return input_error("{}: not valid JSON (truncated?)", file.string());
  if (!j.is_object()) return input_error("{}: not a JSON object", file.string());
  // What --resume trusts from here (the job id, the step, the losses, the
  // re-plan and the planned replicas) is checked against the checkpoints
  // below where it can be; the digests catch an edit of the rest.
  if (auto field = edited_field(j)) {
    if (*field == kDigestsField)
      return input_error("{}: no \"{}\" of its fields (not written by the client, or by an older one); the job "
                         "dir must stay as the job left it", file.string(), kDigestsField);
    return input_error("{}: {} was edited after the client wrote it (its digest in \"{}\" does not match); the job "
                       "dir must stay as the job left it", file.string(), *field, kDigestsField);
  }
  // Each field typed, or one line naming it (a loss that was NaN is written as null).
  const auto read = [&]<class T>(T& out, const char* name, std::optional<T> fallback = std::nullopt) -> Status {
    auto value = json_field<T>(j, name, file.string(), std::move(fallback));
    if (!value.ok()) return input_error("{}", value.message());
    out = std::move(value).value();
    return ok_status();
  };
  JobDirState state;
  SN_TRY(read(state.job_id, "job_id"));
  SN_TRY(read(state.checkpoint_step, "checkpoint_step"));
  SN_TRY(read(state.losses, "losses"));
  SN_TRY(read(state.finished, "finished", std::optional<std::string>("")));
  SN_TRY(read(state.job_toml, "job_toml", std::optional<std::string>("")));
  SN_TRY(read(state.replanned, "replanned", std::optional<bool>(false)));
  SN_TRY(read(state.planned_replicas, "planned_replicas", std::optional<int64_t>(0)));
  SN_TRY(read(state.replicas, "replicas", std::optional<int64_t>(0)));
  SN_TRY(read(state.layout, "layout", std::optional<std::string>(CheckpointMirror::kFirstLayout)));
  if (!CheckpointMirror::is_layout_name(state.layout))
    return input_error("{}: layout \"{}\" is not a checkpoint layout's name (checkpoints or checkpoints-<n>)",
                       file.string(), state.layout);
  // job.toml keeps the job as planned; the replicas it runs on now are
  // state.json's (a job dir written before they were recorded: job.toml's).
  const int64_t planned = state.planned_replicas > 0 ? state.planned_replicas : job.parallel.replicas;
  if (state.replicas == 0) state.replicas = job.parallel.replicas;
  if (state.replicas < 1 || state.replicas > planned)
    return input_error("{}: replicas {} does not fit the {} planned", file.string(), state.replicas, planned);
  JobConfig running = job;
  if (job.parallel.replicas == planned) running.parallel.replicas = state.replicas;
  state.replicas = running.parallel.replicas;
  if (state.checkpoint_step < 0 || static_cast<int64_t>(state.losses.size()) < state.checkpoint_step)
    return input_error("{}: checkpoint_step {} with {} losses", (job_dir / "state.json").string(),
                       state.checkpoint_step, state.losses.size());
  state.losses.resize(static_cast<size_t>(state.checkpoint_step));
  if (state.checkpoint_step == 0) return state;
  CheckpointMirror mirror(job_dir, job.parallel.stages, running.parallel.replicas, state.layout);
  // The nodes would refuse a job that is not the one checkpointed only after
  // discovery and setup, and name a healthy node: compare here, before any
  // node is contacted. What is checked: the roles (stages × replicas), each
  // stage's tensor names and shapes (layers, d_model, …), the seeds and the
  // job id; a hyper-parameter outside the state (lr) may change.
  const int64_t step = state.checkpoint_step;
  const auto [stages, replicas] = checkpointed_roles(mirror, step);
  if (stages == 0) {
    const auto held = checkpointed_steps(mirror);
    return input_error("{}: there is no checkpoint of step {} (state.json's checkpoint_step) in {}; {}",
                       job_dir.string(), step, (job_dir / state.layout).string(),
                       held.empty() ? std::string("it holds none")
                                    : fmt::format("it holds step{} {}", held.size() > 1 ? "s" : "", fmt::join(held, ", ")));
  }
  if (stages != job.parallel.stages || replicas != running.parallel.replicas) {
    // After a re-plan the replicas checked are state.json's, not job.toml's planned ones.
    const std::string expected =
        running.parallel.replicas == job.parallel.replicas
            ? fmt::format("job.toml asks for {} × {}", job.parallel.stages, job.parallel.replicas)
            : fmt::format("the job runs on {} × {} (job.toml's stages, state.json's replicas: re-planned from {})",
                          job.parallel.stages, running.parallel.replicas, job.parallel.replicas);
    return input_error("{}: its checkpoints of step {} are of {} stages × {} replicas, {}; the job must stay the one "
                       "checkpointed",
                       job_dir.string(), step, stages, replicas, expected);
  }
  const auto ranges = stage_layer_ranges(job.model.layers, job.parallel.stages);
  Hash256 saved_cursor{};  // every role's is the same: stage 0 replica 0's
  for (int64_t s = 0; s < job.parallel.stages; ++s) {
    const auto& [first, count] = ranges[static_cast<size_t>(s)];
    const model::StageModel shape_only(job.model, first, count, job.train.seed);
    for (int64_t r = 0; r < running.parallel.replicas; ++r) {
      auto loaded = CheckpointStore(mirror.role_dir(s, r), 1).load(step);
      if (!loaded.ok())
        return input_error("{}: the checkpoint of stage {} replica {} at step {} is not usable: {}", job_dir.string(),
                           s, r, step, loaded.message());
      const std::string role = fmt::format("{}: the checkpoint of stage {} replica {} at step {}", job_dir.string(), s, r, step);
      if (auto differs = differs_from_job(*loaded, shape_only, running, s, state.job_id))
        return input_error("{} {}; the job must stay the one checkpointed", role, *differs);
      if (s == 0 && r == 0) saved_cursor = loaded->manifest.state.part(StatePart::cursor);
    }
  }
  if (!state.job_toml.empty()) {
    // What feeds the data cursor (the samples each step draws) is in the
    // state the nodes check: refuse it here, not after setup naming a node.
    static const std::set<std::string> cursor_fields = {"train.global_batch", "data.corpus", "data.tokenizer_corpus",
                                                        "data.holdout_fraction", "model.seq_len"};
    for (const auto& [key, change] : changed_fields(state.job_toml, job_to_toml(running))) {
      if (cursor_fields.count(key))
        return input_error("{}: job.toml's {} changes the data cursor its checkpoint of step {} holds; the job must "
                           "stay the one checkpointed", job_dir.string(), change, step);
      state.changed.push_back(change);
    }
  }
  // The cursor itself, against the corpus as it is now (a corpus edited in
  // place, or a job dir with no job_toml). A checkpoint that predates a
  // re-plan counts the old replicas: the nodes take the new cursor then.
  if (!state.replanned) {
    auto corpus = model::prepare_corpus(job.data, static_cast<int>(job.model.vocab));
    if (!corpus.ok()) return input_error("{}: {}", job_dir.string(), corpus.message());
    state.corpus = std::make_shared<const model::TokenizedCorpus>(std::move(corpus).value());
    const model::Dataset data(state.corpus->tokens, job.model.seq_len, job.data.holdout_fraction);
    TrainingState cursor_only;
    cursor_only.cursor = {step, data.train_samples(), job.train.global_batch, running.parallel.replicas};
    if (training_state_digest(cursor_only).part(StatePart::cursor) != saved_cursor)
      return input_error("{}: its checkpoint of step {} does not hold the data cursor job.toml gives ({} training "
                         "samples, global batch {}, {} replicas): the corpus or the batch differ; the job must stay "
                         "the one checkpointed", job_dir.string(), step, data.train_samples(), job.train.global_batch,
                         running.parallel.replicas);
  }
  if (state.planned_replicas < 0 || (state.planned_replicas > 0 && (state.planned_replicas < running.parallel.replicas ||
                                                                    job.train.global_batch % state.planned_replicas)))
    return input_error("{}: planned_replicas {} does not fit job.toml's {} replicas and global batch of {}",
                       (job_dir / "state.json").string(), state.planned_replicas, running.parallel.replicas,
                       job.train.global_batch);
  return state;
}

std::vector<TakeoverAnswer> end_stopped_run(const std::vector<net::MemberInfo>& nodes, const std::string& job_id,
                                            const NodeKey& client_key, std::chrono::milliseconds timeout) {
  net::ControlSigner signer(client_key);
  std::vector<TakeoverAnswer> answers(nodes.size());
  std::vector<std::thread> calls;
  for (size_t i = 0; i < nodes.size(); ++i)
    calls.emplace_back([&, i] {
      auto stub = solvernet::v1::Train::NewStub(net::make_channel(nodes[i].address, nodes[i].node_id));
      solvernet::v1::EndJobRequest request;
      request.set_job_id(job_id);
      request.set_abort(true);
      request.set_takeover(true);
      request.set_reason("its client stopped and resumed it");
      sign_request(signer, "EndJob", request);
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + timeout);
      solvernet::v1::Empty reply;
      const grpc::Status status = stub->EndJob(&context, request, &reply);
      TakeoverAnswer& answer = answers[i];
      answer.node_id = nodes[i].node_id;
      solvernet::v1::Refusal refusal;
      const bool typed = !status.ok() && refusal.ParseFromString(status.error_details());
      if (status.ok())
        answer.outcome = TakeoverAnswer::Outcome::ended;
      else if (typed && refusal.cause() == solvernet::v1::Refusal::OTHER_CLIENT)
        answer.outcome = TakeoverAnswer::Outcome::other_client;
      else if (typed && refusal.cause() == solvernet::v1::Refusal::CLIENT_LIVE) {
        answer.outcome = TakeoverAnswer::Outcome::client_live;
        answer.renewed_ago = std::chrono::milliseconds(refusal.renewed_ms_ago());
        answer.quiet = std::chrono::milliseconds(refusal.quiet_ms());
      }
    });
  for (auto& call : calls) call.join();
  return answers;
}

bool replannable(const JobConfig& job) { return !job.verify.enabled && !job.privacy.enabled; }

int64_t replicas_that_fit(const JobConfig& job, int64_t nodes) {
  for (int64_t r = std::min(job.parallel.replicas, nodes / std::max<int64_t>(1, job.parallel.stages)); r > 0; --r)
    if (job.train.global_batch % (r * job.parallel.micro_batches) == 0) return r;
  return 0;
}

std::string resume_advice(const fs::path& job_dir, int64_t step, const std::string& note) {
  if (step <= 0)
    return fmt::format("no checkpoint was mirrored yet (set train.checkpoint_every); the job dir is {}",
                       job_dir.string());
  // The layout state.json names is the one --resume reads (checkpoints-<n>
  // after a re-plan or grow-back); read now, as the job leaves it.
  std::string layout;
  if (auto text = read_file(job_dir / "state.json"); text.ok()) {
    const auto j = nlohmann::json::parse(*text, nullptr, false);
    if (j.is_object() && j.contains("layout") && j["layout"].is_string() &&
        CheckpointMirror::is_layout_name(j["layout"].get<std::string>()))
      layout = j["layout"].get<std::string>();
  }
  return fmt::format("the job stopped at its checkpoint of step {}{} in {}; continue it with: solvernet train --resume "
                     "{} --bootstrap HOST:PORT",
                     step, note.empty() ? "" : " (" + note + ")", (layout.empty() ? job_dir : job_dir / layout).string(),
                     job_dir.string());
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
