#include "train/state.h"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/fs.h"
#include "model/safetensors.h"
#include "train/hashing.h"
#include "train/json_fields.h"

namespace sn::train {
namespace {

static_assert(std::endian::native == std::endian::little,
              "tensor bytes enter the state hash as stored: little-endian");

using hashing::put_string;

void put_tensors(Hasher& h, const NamedTensors& tensors) {
  h.update_u64(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    put_string(h, name);
    hashing::put_tensor(h, tensor);
  }
}

Hasher part_hasher(StatePart part) {
  Hasher h;
  put_string(h, std::string("solvernet/state/v1/") + state_part_name(part));
  return h;
}

constexpr const char* kManifestFormat = "solvernet-checkpoint-v1";

// "step-000000000012" → 12; anything else → nullopt.
std::optional<int64_t> step_of(const std::string& stem) {
  constexpr std::string_view prefix = "step-";
  if (stem.size() != prefix.size() + 12 || stem.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  int64_t step = 0;
  auto [end, ec] = std::from_chars(stem.data() + prefix.size(), stem.data() + stem.size(), step);
  if (ec != std::errc() || end != stem.data() + stem.size() || step < 0) return std::nullopt;
  return step;
}

Result<Hash256> hash_from_hex(const std::string& hex, const std::string& what) {
  auto raw = from_hex(hex);
  if (!raw.ok() || raw->size() != 32) return make_error("{} is not 64 hex digits", what);
  Hash256 out;
  std::memcpy(out.data(), raw->data(), 32);
  return out;
}

std::string manifest_json(int64_t step, const std::map<std::string, std::string>& labels,
                          const StateDigest& state, const std::vector<CheckpointFile>& files) {
  nlohmann::ordered_json j;
  j["format"] = kManifestFormat;
  j["step"] = step;
  j["labels"] = labels;
  j["state_layout"] = kStateLayoutVersion;
  j["state_hash"] = to_hex(state.root);
  nlohmann::ordered_json parts;
  for (size_t p = 0; p < kStateParts; ++p)
    parts[state_part_name(static_cast<StatePart>(p))] = to_hex(state.parts[p]);
  j["state_parts"] = parts;
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const auto& f : files)
    list.push_back({{"name", f.name}, {"bytes", f.bytes}, {"blake2b", to_hex(f.blake2b)}});
  j["files"] = list;
  return j.dump(2) + "\n";
}

Result<CheckpointManifest> parse_manifest(const std::string& text, const std::filesystem::path& path) {
  const std::string where = "checkpoint manifest " + path.string();
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return make_error("{} is not valid JSON (truncated?)", where);
  SN_ASSIGN(const std::string format, json_field<std::string>(j, "format", where, std::string()));
  if (format != kManifestFormat) return make_error("{}: format is not {}", where, kManifestFormat);
  SN_ASSIGN(const uint64_t layout, json_field<uint64_t>(j, "state_layout", where));
  if (layout != kStateLayoutVersion)
    return make_error("{}: state layout {} is not the supported {}", where, layout, kStateLayoutVersion);
  CheckpointManifest m;
  SN_ASSIGN(m.step, json_field<int64_t>(j, "step", where));
  using Strings = std::map<std::string, std::string>;
  SN_ASSIGN(m.labels, json_field<Strings>(j, "labels", where, Strings()));
  SN_ASSIGN(const std::string root, json_field<std::string>(j, "state_hash", where));
  SN_ASSIGN(m.state.root, hash_from_hex(root, where + ": state_hash"));
  SN_ASSIGN(const Strings parts, json_field<Strings>(j, "state_parts", where));
  for (size_t p = 0; p < kStateParts; ++p) {
    const char* name = state_part_name(static_cast<StatePart>(p));
    const auto it = parts.find(name);
    if (it == parts.end()) return make_error("{}: no field \"state_parts.{}\"", where, name);
    SN_ASSIGN(m.state.parts[p], hash_from_hex(it->second, fmt::format("{}: state_parts.{}", where, name)));
  }
  const auto files = j.find("files");
  if (files == j.end()) return make_error("{}: no field \"files\"", where);
  if (!files->is_array()) return make_error("{}: files is {}, not an array", where, json_kind(*files));
  for (size_t i = 0; i < files->size(); ++i) {
    const auto& f = (*files)[i];
    const std::string entry = fmt::format("{}: files[{}]", where, i);
    CheckpointFile file;
    SN_ASSIGN(file.name, json_field<std::string>(f, "name", entry));
    if (file.name.empty() || file.name.find('/') != std::string::npos || file.name[0] == '.')
      return make_error("{}: file name \"{}\" is not a plain name in its directory", where, file.name);
    SN_ASSIGN(file.bytes, json_field<uint64_t>(f, "bytes", entry));
    SN_ASSIGN(const std::string blake2b, json_field<std::string>(f, "blake2b", entry));
    SN_ASSIGN(file.blake2b, hash_from_hex(blake2b, where + ": " + file.name));
    m.files.push_back(std::move(file));
  }
  if (m.files.empty()) return make_error("{} names no files", where);
  return m;
}

}  // namespace

const char* state_part_name(StatePart part) {
  switch (part) {
    case StatePart::weights: return "weights";
    case StatePart::optimizer: return "optimizer";
    case StatePart::residuals: return "residuals";
    case StatePart::activation_buffers: return "activation_buffers";
    case StatePart::cursor: return "cursor";
    case StatePart::rng: return "rng";
  }
  return "?";
}

StateDigest training_state_digest(const TrainingState& state) {
  StateDigest out;
  auto set = [&](StatePart part, Hasher& h) { out.parts[static_cast<size_t>(part)] = h.finish(); };
  {
    Hasher h = part_hasher(StatePart::weights);
    put_tensors(h, state.weights);
    set(StatePart::weights, h);
  }
  {
    Hasher h = part_hasher(StatePart::optimizer);
    put_tensors(h, state.optimizer);
    set(StatePart::optimizer, h);
  }
  {
    Hasher h = part_hasher(StatePart::residuals);
    put_tensors(h, state.residuals);
    set(StatePart::residuals, h);
  }
  {
    Hasher h = part_hasher(StatePart::activation_buffers);
    h.update_u64(state.activation_buffers.size());
    for (const auto& [name, digest] : state.activation_buffers) {
      put_string(h, name);
      h.update(digest);
    }
    set(StatePart::activation_buffers, h);
  }
  {
    Hasher h = part_hasher(StatePart::cursor);
    h.update_u64(static_cast<uint64_t>(state.cursor.next_step))
        .update_u64(static_cast<uint64_t>(state.cursor.dataset_samples))
        .update_u64(static_cast<uint64_t>(state.cursor.global_batch))
        .update_u64(static_cast<uint64_t>(state.cursor.replicas));
    set(StatePart::cursor, h);
  }
  {
    Hasher h = part_hasher(StatePart::rng);
    h.update_u64(state.rng.job_seed)
        .update_u64(static_cast<uint64_t>(state.rng.stage))
        .update_u64(static_cast<uint64_t>(state.rng.replica));
    set(StatePart::rng, h);
  }
  Hasher root;
  put_string(root, "solvernet/state/v1");
  root.update_u64(kStateLayoutVersion);
  for (const auto& part : out.parts) root.update(part);
  out.root = root.finish();
  Hasher replica;
  put_string(replica, "solvernet/state/v1/replica");
  for (StatePart p : {StatePart::weights, StatePart::optimizer, StatePart::cursor}) replica.update(out.part(p));
  out.replica = replica.finish();
  return out;
}

std::optional<std::string> checkpoint_role_mismatch(const CheckpointManifest& manifest, const std::string& job_id,
                                                    int64_t stage, int64_t replica, bool any_replica) {
  const auto label = [&](const char* key) {
    const auto it = manifest.labels.find(key);
    return it == manifest.labels.end() ? std::string("(none)") : it->second;
  };
  if (label("job_id") == job_id && label("stage") == std::to_string(stage) &&
      (any_replica || label("replica") == std::to_string(replica)))
    return std::nullopt;
  return fmt::format("it is labelled job {} stage {} replica {}, not job {} stage {} replica {}", label("job_id"),
                     label("stage"), label("replica"), job_id, stage, replica);
}

CheckpointStore::CheckpointStore(std::filesystem::path dir, int64_t keep)
    : dir_(std::move(dir)), keep_(std::max<int64_t>(1, keep)) {}

std::filesystem::path CheckpointStore::data_path(int64_t step) const {
  return dir_ / fmt::format("step-{:012d}.safetensors", step);
}

std::filesystem::path CheckpointStore::manifest_path(int64_t step) const {
  return dir_ / fmt::format("step-{:012d}.manifest.json", step);
}

Status CheckpointStore::save(int64_t step, const NamedTensors& tensors,
                             const std::map<std::string, std::string>& labels, const StateDigest& state,
                             const std::vector<std::pair<std::string, std::filesystem::path>>& extra_files) {
  SN_TRY(ensure_directory(dir_));
  std::map<std::string, std::string> metadata = labels;
  metadata["step"] = std::to_string(step);
  const std::string data = model::safetensors_bytes(tensors, metadata);
  std::vector<CheckpointFile> files{{data_path(step).filename().string(), data.size(), hash_string(data)}};
  // Data first, manifest last: a manifest on disk always names durable data.
  const auto write_all = [&]() -> Status {
    SN_TRY(write_file_atomic(data_path(step), data));
    for (const auto& [name, source] : extra_files) {
      SN_ASSIGN(std::string bytes, read_file(source));
      const auto target = dir_ / fmt::format("step-{:012d}.{}", step, name);
      SN_TRY(write_file_atomic(target, bytes));
      files.push_back({target.filename().string(), bytes.size(), hash_string(bytes)});
    }
    return write_file_atomic(manifest_path(step), manifest_json(step, labels, state, files));
  };
  if (Status written = write_all(); !written.ok()) {
    remove_step(step);
    return written;
  }

  // Prune: the oldest complete checkpoints beyond KEEP (manifest first, so a
  // crash mid-prune leaves orphan data, never a manifest without its data),
  // data files without a manifest older than the newest kept one, and temp
  // files a killed writer left behind. Checkpoints of steps after STEP go
  // too: this role's state is now at STEP, so they belong to a run that was
  // rolled back (a recovery or a resume redoes those steps); kept, they would
  // outrank the new ones and push them out.
  std::vector<int64_t> complete = steps();
  std::erase_if(complete, [&](int64_t s) { return s > step; });
  std::set<int64_t> kept;
  for (size_t i = complete.size() > static_cast<size_t>(keep_) ? complete.size() - static_cast<size_t>(keep_) : 0;
       i < complete.size(); ++i)
    kept.insert(complete[i]);
  std::error_code ec;
  for (int64_t old : steps())
    if (!kept.count(old)) std::filesystem::remove(manifest_path(old), ec);
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.find(".tmp-") != std::string::npos) {
      std::filesystem::remove(entry.path(), ec);
      continue;
    }
    // Data and buffer copies: step-<12 digits>.<anything>, manifests gone already.
    if (name.size() < 18 || name[17] != '.') continue;
    auto s = step_of(name.substr(0, 17));
    if (s && !kept.count(*s)) std::filesystem::remove(entry.path(), ec);
  }
  return ok_status();
}

void CheckpointStore::remove_step(int64_t step) const {
  std::error_code ec;
  std::filesystem::remove(manifest_path(step), ec);
  const std::string stem = data_path(step).stem().string() + ".";
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec))
    if (entry.path().filename().string().starts_with(stem)) std::filesystem::remove(entry.path(), ec);
}

std::vector<int64_t> CheckpointStore::steps() const {
  std::vector<int64_t> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
    const std::string name = entry.path().filename().string();
    constexpr std::string_view suffix = ".manifest.json";
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    if (auto s = step_of(name.substr(0, name.size() - suffix.size()))) out.push_back(*s);
  }
  std::sort(out.begin(), out.end());
  return out;
}

Result<LoadedCheckpoint> CheckpointStore::load(int64_t step) const {
  const auto manifest_file = manifest_path(step);
  if (!std::filesystem::exists(manifest_file)) {
    std::string have;
    for (int64_t s : steps()) have += (have.empty() ? "" : ", ") + std::to_string(s);
    return kind_error(ErrorKind::not_found, "no checkpoint of step {} in {} (complete ones: {})", step,
                      dir_.string(), have.empty() ? "none" : have);
  }
  SN_ASSIGN(std::string text, read_file(manifest_file));
  LoadedCheckpoint out;
  SN_ASSIGN(out.manifest, parse_manifest(text, manifest_file));
  if (out.manifest.step != step)
    return make_error("checkpoint manifest {} says step {}, its name says {}", manifest_file.string(),
                      out.manifest.step, step);
  for (const auto& file : out.manifest.files) {
    const auto path = dir_ / file.name;
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) return make_error("checkpoint file {} is missing: {}", path.string(), ec.message());
    if (size != file.bytes)
      return make_error("checkpoint file {} is truncated or altered: {} bytes, its manifest says {}", path.string(),
                        size, file.bytes);
    SN_ASSIGN(std::string data, read_file(path));
    if (hash_string(data) != file.blake2b)
      return make_error("checkpoint file {} does not match the BLAKE2b in its manifest (altered or corrupt)",
                        path.string());
    if (path.extension() == ".safetensors") {
      auto tensors = model::load_safetensors_bytes(data);
      if (!tensors.ok()) return make_error("checkpoint file {}: {}", path.string(), tensors.message());
      for (auto& entry : *tensors) out.tensors.push_back(std::move(entry));
    }
  }
  return out;
}

}  // namespace sn::train
