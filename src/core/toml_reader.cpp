#include "core/toml_reader.h"

#include <fmt/format.h>

#include <cmath>

#include "core/fs.h"

namespace sn {

Result<TomlFile> TomlFile::parse_string(std::string_view text, std::string display_name) {
  TomlFile file;
  file.name_ = std::move(display_name);
  try {
    file.table_ = std::make_shared<toml::table>(toml::parse(text, file.name_));
  } catch (const toml::parse_error& e) {
    return input_error("{}:{}: {}", file.name_, e.source().begin.line, e.description());
  }
  return file;
}

Result<TomlFile> TomlFile::parse_file(const std::filesystem::path& path) {
  SN_ASSIGN(std::string text, read_file(path));
  return parse_string(text, path.string());
}

TomlTable TomlFile::root() { return TomlTable(name_, "", table_.get(), error_, 1); }

Status TomlFile::status() const {
  if (error_->has_value()) return **error_;
  return ok_status();
}

TomlTable::TomlTable(std::string file, std::string path, const toml::table* table,
                     std::shared_ptr<std::optional<Error>> error, int line)
    : file_(std::move(file)), path_(std::move(path)), table_(table),
      file_error_(std::move(error)), line_(line) {}

std::string TomlTable::qualified(const std::string& key) const {
  return path_.empty() ? key : path_ + "." + key;
}

int TomlTable::line() const { return line_; }

int TomlTable::line_of(const std::string& key) const {
  if (table_) {
    if (const toml::node* node = table_->get(key)) {
      auto begin = node->source().begin;
      if (begin.line > 0) return static_cast<int>(begin.line);
    }
  }
  return line_;
}

void TomlTable::fail(const std::string& key, const std::string& message) {
  if (file_error_->has_value()) return;
  *file_error_ = Error{fmt::format("{}:{}: {}", file_, line_of(key), message), kExitBadInput};
}

void TomlTable::fail_here(const std::string& message) {
  if (file_error_->has_value()) return;
  *file_error_ = Error{fmt::format("{}:{}: {}", file_, line_, message), kExitBadInput};
}

bool TomlTable::has(const std::string& key) const { return table_ && table_->contains(key); }

const toml::node* TomlTable::get(const std::string& key) {
  seen_->insert(key);
  return table_ ? table_->get(key) : nullptr;
}

int64_t TomlTable::integer(const std::string& key, int64_t fallback, int64_t min, int64_t max) {
  const toml::node* node = get(key);
  if (!node) return fallback;
  auto value = node->value<int64_t>();
  if (!node->is_integer() || !value) {
    fail(key, fmt::format("{} must be an integer", qualified(key)));
    return fallback;
  }
  if (*value < min || *value > max) {
    fail(key, fmt::format("{} must be in [{}, {}], got {}", qualified(key), min, max, *value));
    return fallback;
  }
  return *value;
}

int64_t TomlTable::required_integer(const std::string& key, int64_t min, int64_t max) {
  if (!has(key)) {
    seen_->insert(key);
    fail_here(fmt::format("missing {}", qualified(key)));
    return min;
  }
  return integer(key, min, min, max);
}

double TomlTable::number(const std::string& key, double fallback, double min, double max) {
  const toml::node* node = get(key);
  if (!node) return fallback;
  if (!node->is_number()) {
    fail(key, fmt::format("{} must be a number", qualified(key)));
    return fallback;
  }
  double value = *node->value<double>();
  if (!std::isfinite(value) || value < min || value > max) {
    fail(key, fmt::format("{} must be in [{}, {}], got {}", qualified(key), min, max, value));
    return fallback;
  }
  return value;
}

double TomlTable::required_number(const std::string& key, double min, double max) {
  if (!has(key)) {
    seen_->insert(key);
    fail_here(fmt::format("missing {}", qualified(key)));
    return min;
  }
  return number(key, min, min, max);
}

std::string TomlTable::string(const std::string& key, const std::string& fallback) {
  const toml::node* node = get(key);
  if (!node) return fallback;
  if (!node->is_string()) {
    fail(key, fmt::format("{} must be a string", qualified(key)));
    return fallback;
  }
  return *node->value<std::string>();
}

std::string TomlTable::required_string(const std::string& key) {
  if (!has(key)) {
    seen_->insert(key);
    fail_here(fmt::format("missing {}", qualified(key)));
    return "";
  }
  return string(key, "");
}

std::string TomlTable::choice(const std::string& key, const std::string& fallback,
                              const std::vector<std::string>& allowed) {
  std::string value = string(key, fallback);
  for (const auto& a : allowed)
    if (a == value) return value;
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
  fail(key, fmt::format("{} must be one of {}, got \"{}\"", qualified(key), list, value));
  return fallback;
}

bool TomlTable::boolean(const std::string& key, bool fallback) {
  const toml::node* node = get(key);
  if (!node) return fallback;
  if (!node->is_boolean()) {
    fail(key, fmt::format("{} must be true or false", qualified(key)));
    return fallback;
  }
  return *node->value<bool>();
}

std::vector<std::string> TomlTable::strings(const std::string& key) {
  std::vector<std::string> out;
  const toml::node* node = get(key);
  if (!node) return out;
  const toml::array* array = node->as_array();
  if (!array) {
    fail(key, fmt::format("{} must be an array of strings", qualified(key)));
    return out;
  }
  for (const auto& item : *array) {
    if (!item.is_string()) {
      fail(key, fmt::format("{} must be an array of strings", qualified(key)));
      return {};
    }
    out.push_back(*item.value<std::string>());
  }
  return out;
}

TomlTable TomlTable::table(const std::string& key) {
  const toml::node* node = get(key);
  if (node && !node->is_table()) {
    fail(key, fmt::format("{} must be a table", qualified(key)));
    node = nullptr;
  }
  int line = node ? static_cast<int>(node->source().begin.line) : line_;
  return TomlTable(file_, qualified(key), node ? node->as_table() : nullptr, file_error_,
                   line > 0 ? line : line_);
}

std::vector<TomlTable> TomlTable::tables(const std::string& key) {
  std::vector<TomlTable> out;
  const toml::node* node = get(key);
  if (!node) return out;
  const toml::array* array = node->as_array();
  if (!array) {
    fail(key, fmt::format("{} must be an array of tables ([[{}]])", qualified(key), key));
    return out;
  }
  size_t index = 0;
  for (const auto& item : *array) {
    if (!item.is_table()) {
      fail(key, fmt::format("{}[{}] must be a table", qualified(key), index));
      return {};
    }
    int line = static_cast<int>(item.source().begin.line);
    out.push_back(TomlTable(file_, fmt::format("{}[{}]", qualified(key), index),
                            item.as_table(), file_error_, line > 0 ? line : line_));
    ++index;
  }
  return out;
}

void TomlTable::reject_unknown_keys() {
  if (!table_) return;
  for (const auto& [key, node] : *table_) {
    std::string name(key.str());
    if (!seen_->count(name)) {
      if (file_error_->has_value()) return;
      int line = static_cast<int>(node.source().begin.line);
      *file_error_ = Error{fmt::format("{}:{}: unknown key {}", file_, line > 0 ? line : line_,
                                       qualified(name)),
                           kExitBadInput};
      return;
    }
  }
}

}  // namespace sn
