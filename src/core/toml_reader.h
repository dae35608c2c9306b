// Reads TOML config files and reports problems as `file:line: what is wrong`.
// Each getter validates range and type; unknown keys are errors (they are
// almost always typos). The first error wins and later getters return defaults.
#pragma once

#include <toml++/toml.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/result.h"

namespace sn {

class TomlTable;

class TomlFile {
 public:
  static Result<TomlFile> parse_file(const std::filesystem::path& path);
  static Result<TomlFile> parse_string(std::string_view text, std::string display_name);

  TomlTable root();
  // Error for the whole file or for the first failed getter; empty if none.
  const std::optional<Error>& error() const { return *error_; }
  Status status() const;
  const std::string& name() const { return name_; }

 private:
  friend class TomlTable;
  std::string name_;
  std::shared_ptr<toml::table> table_;
  std::shared_ptr<std::optional<Error>> error_ = std::make_shared<std::optional<Error>>();
};

class TomlTable {
 public:
  bool has(const std::string& key) const;
  int64_t integer(const std::string& key, int64_t fallback, int64_t min, int64_t max);
  int64_t required_integer(const std::string& key, int64_t min, int64_t max);
  double number(const std::string& key, double fallback, double min, double max);
  double required_number(const std::string& key, double min, double max);
  std::string string(const std::string& key, const std::string& fallback);
  std::string required_string(const std::string& key);
  std::string choice(const std::string& key, const std::string& fallback,
                     const std::vector<std::string>& allowed);
  bool boolean(const std::string& key, bool fallback);
  std::vector<std::string> strings(const std::string& key);
  // A sub-table; an absent key gives an empty table (all defaults).
  TomlTable table(const std::string& key);
  std::vector<TomlTable> tables(const std::string& key);  // [[key]] arrays

  // Reports keys of this table that no getter asked for.
  void reject_unknown_keys();
  // Records an error at this table's (or KEY's) line.
  void fail(const std::string& key, const std::string& message);
  void fail_here(const std::string& message);
  int line_of(const std::string& key) const;
  int line() const;
  const std::string& path() const { return path_; }
  bool failed() const { return file_error_->has_value(); }

 private:
  friend class TomlFile;
  TomlTable(std::string file, std::string path, const toml::table* table,
            std::shared_ptr<std::optional<Error>> error, int line);
  std::string qualified(const std::string& key) const;
  const toml::node* get(const std::string& key);

  std::string file_;
  std::string path_;
  const toml::table* table_;
  std::shared_ptr<std::optional<Error>> file_error_;
  std::shared_ptr<std::set<std::string>> seen_ = std::make_shared<std::set<std::string>>();
  int line_;
};

}  // namespace sn
