#include "model/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cstring>

#include "core/fs.h"

namespace sn::model {

// Both formats are little-endian; tensor bytes are copied as they lie in memory.
static_assert(std::endian::native == std::endian::little, "solvernet assumes a little-endian host");
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;

const std::pair<const char*, torch::ScalarType> kTypes[] = {
    {"F32", torch::kFloat32}, {"F16", torch::kFloat16}, {"BF16", torch::kBFloat16}, {"F64", torch::kFloat64},
    {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"U8", torch::kUInt8}};

std::optional<torch::ScalarType> type_of(const std::string& name) {
  for (const auto& [n, t] : kTypes)
    if (name == n) return t;
  return std::nullopt;
}

std::string name_of(torch::ScalarType type) {
  for (const auto& [n, t] : kTypes)
    if (type == t) return n;
  throw std::invalid_argument("safetensors: unsupported dtype");
}

// What a file that is not safetensors probably is, for the message.
std::string what_it_is(std::string_view bytes) {
  if (bytes.starts_with("PK\x03\x04"))
    return "it is a zip archive (a PyTorch .bin/.pt checkpoint?); convert it to safetensors first";
  if (bytes.size() >= 2 && static_cast<uint8_t>(bytes[0]) == 0x80 && bytes[1] >= 2 && bytes[1] <= 5)
    return "it is a Python pickle (an old PyTorch checkpoint?); convert it to safetensors first";
  if (bytes.starts_with("GGUF")) return "it is a GGUF file";
  if (bytes.starts_with("\x89HDF")) return "it is an HDF5 file (Keras?)";
  return "";
}

// Every reader error is the caller's input (exit 2): a file or bytes handed to us.
template <class... Args>
Error not_safetensors(std::string_view bytes, fmt::format_string<Args...> format, Args&&... args) {
  std::string message = fmt::format(format, std::forward<Args>(args)...);
  if (!message.starts_with("not a safetensors file")) message = "safetensors: " + message;
  if (auto guess = what_it_is(bytes); !guess.empty()) message = "not a safetensors file: " + guess;
  return input_error("{}", message);
}

Result<nlohmann::ordered_json> read_header(std::string_view bytes, uint64_t* header_len) {
  if (bytes.empty()) return input_error("not a safetensors file: the file is empty");
  if (bytes.size() < 8)
    return not_safetensors(bytes, "not a safetensors file: {} bytes are shorter than its 8-byte header length",
                           bytes.size());
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[static_cast<size_t>(i)])) << (8 * i);
  if (n > bytes.size() - 8)
    return not_safetensors(bytes, "not a safetensors file (or a truncated one): header length {} exceeds the file ({} bytes)",
                           n, bytes.size());
  if (n > kMaxHeaderBytes)
    return not_safetensors(bytes, "header of {} bytes is larger than the format's 100 MB limit", n);
  nlohmann::ordered_json header;
  try {
    header = nlohmann::ordered_json::parse(bytes.substr(8, n));
  } catch (const std::exception&) {
    return not_safetensors(bytes, "not a safetensors file: its header is not valid JSON");
  }
  if (!header.is_object()) return not_safetensors(bytes, "not a safetensors file: its header is not a JSON object");
  *header_len = n;
  return header;
}

}  // namespace

std::string safetensors_bytes(const NamedTensors& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> contiguous;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    torch::Tensor c = tensor.detach().to(torch::kCPU).contiguous();
    uint64_t size = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", name_of(c.scalar_type())}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + size}}};
    offset += size;
    contiguous.push_back(c);
  }
  std::string json = header.dump();
  while ((json.size() + 8) % 8 != 0) json.push_back(' ');  // data starts 8-byte aligned
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += json;
  out.reserve(out.size() + offset);
  for (const auto& c : contiguous)
    out.append(static_cast<const char*>(c.data_ptr()), static_cast<size_t>(c.numel()) * c.element_size());
  return out;
}

Status save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                        const std::map<std::string, std::string>& metadata) {
  return write_file_atomic(path, safetensors_bytes(tensors, metadata));
}

Result<NamedTensors> load_safetensors_bytes(std::string_view bytes) {
  uint64_t header_len = 0;
  SN_ASSIGN(auto header, read_header(bytes, &header_len));
  const uint64_t data_size = bytes.size() - 8 - header_len;
  const char* data = bytes.data() + 8 + header_len;
  struct Entry {
    std::string name;
    torch::ScalarType type;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      auto type = type_of(info.at("dtype").get<std::string>());
      if (!type) return input_error("safetensors: tensor {} has unknown dtype {}", name, info.at("dtype").dump());
      auto shape = info.at("shape").get<std::vector<int64_t>>();
      auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size)
        return input_error("safetensors: tensor {} has a byte range outside the data (ends at {}, the data has {} bytes): the file is truncated or corrupt", name, offsets.size() == 2 ? offsets[1] : 0, data_size);
      uint64_t elements = 1;
      for (int64_t d : shape) {
        if (d < 0 || (d > 0 && elements > (uint64_t(1) << 40) / static_cast<uint64_t>(d)))
          return input_error("safetensors: tensor {} has an invalid shape", name);
        elements *= static_cast<uint64_t>(d);
      }
      if (elements * c10::elementSize(*type) != offsets[1] - offsets[0])
        return input_error("safetensors: tensor {} has {} bytes but its shape needs {}", name, offsets[1] - offsets[0],
                          elements * c10::elementSize(*type));
      entries.push_back({name, *type, shape, offsets[0], offsets[1]});
    } catch (const nlohmann::json::exception&) {
      return input_error("safetensors: tensor {} lacks dtype, shape or data_offsets", name);
    }
  }
  std::vector<Entry> sorted = entries;
  std::sort(sorted.begin(), sorted.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  // The format requires the data to be covered exactly: no overlaps, no holes.
  uint64_t covered = 0;
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (i > 0 && sorted[i].begin < sorted[i - 1].end)
      return input_error("safetensors: tensors {} and {} overlap", sorted[i - 1].name, sorted[i].name);
    if (sorted[i].begin != covered)
      return input_error("safetensors: bytes {}..{} before tensor {} belong to no tensor", covered, sorted[i].begin, sorted[i].name);
    covered = sorted[i].end;
  }
  if (covered != data_size) return input_error("safetensors: {} bytes after the last tensor belong to no tensor", data_size - covered);
  NamedTensors out;
  for (const auto& e : sorted) {
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(e.type));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data + e.begin, e.end - e.begin);
    out.emplace_back(e.name, t);
  }
  return out;
}

Result<NamedTensors> load_safetensors(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) return input_error("{}: is a directory, not a safetensors file", path.string());
  // A device or a pipe (/dev/zero) would be read without end.
  if (std::filesystem::exists(path, ec) && !std::filesystem::is_regular_file(path, ec))
    return input_error("{}: not a regular file", path.string());
  SN_ASSIGN(std::string bytes, read_file(path));
  auto tensors = load_safetensors_bytes(bytes);
  if (!tensors.ok()) {
    Error error = tensors.error();
    error.message = path.string() + ": " + error.message;
    return error;
  }
  return tensors;
}

Result<std::map<std::string, std::string>> safetensors_metadata(std::string_view bytes) {
  uint64_t header_len = 0;
  SN_ASSIGN(auto header, read_header(bytes, &header_len));
  std::map<std::string, std::string> out;
  if (header.contains("__metadata__")) {
    for (const auto& [k, v] : header["__metadata__"].items())
      if (v.is_string()) out[k] = v.get<std::string>();
  }
  return out;
}

std::map<std::string, std::string> model_file_metadata(const std::string& name, const ModelConfig& c,
                                                       const std::string& tokenizer_vocab) {
  nlohmann::json config = {{"layers", c.layers}, {"d_model", c.d_model}, {"heads", c.heads},
                           {"d_ff", c.d_ff},     {"vocab", c.vocab},     {"seq_len", c.seq_len}};
  return {{kModelNameKey, name}, {kModelConfigKey, config.dump()}, {kTokenizerKey, tokenizer_vocab}};
}

}  // namespace sn::model
