// Private to sn_train: typed reads of the fields of the JSON files the client
// and the nodes write (a job dir's state.json, checkpoint manifests). A field
// that is missing or of another type (a NaN loss is written as null) is an
// error naming the field and the file, never nlohmann's exception text.
#pragma once

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "core/result.h"

namespace sn::train {

// What V is, for messages: "null", "a string", "a number", …
inline std::string json_kind(const nlohmann::json& v) {
  switch (v.type()) {
    case nlohmann::json::value_t::null: return "null";
    case nlohmann::json::value_t::boolean: return "a boolean";
    case nlohmann::json::value_t::string: return "a string";
    case nlohmann::json::value_t::array: return "an array";
    case nlohmann::json::value_t::object: return "an object";
    case nlohmann::json::value_t::number_float: return "a real number";
    case nlohmann::json::value_t::number_integer: return v.get<int64_t>() < 0 ? "a negative integer" : "an integer";
    case nlohmann::json::value_t::number_unsigned: return "an integer";
    default: return "not a JSON value";
  }
}

namespace json_detail {

template <class T>
struct Wanted;
template <>
struct Wanted<std::string> {
  static constexpr const char* name = "a string";
  static bool fits(const nlohmann::json& v) { return v.is_string(); }
};
template <>
struct Wanted<bool> {
  static constexpr const char* name = "true or false";
  static bool fits(const nlohmann::json& v) { return v.is_boolean(); }
};
template <>
struct Wanted<int64_t> {
  static constexpr const char* name = "an integer";
  static bool fits(const nlohmann::json& v) {
    return v.is_number_integer() && (v.is_number_unsigned() ? v.get<uint64_t>() <= INT64_MAX : true);
  }
};
template <>
struct Wanted<uint64_t> {
  static constexpr const char* name = "an integer ≥ 0";
  static bool fits(const nlohmann::json& v) { return v.is_number_unsigned(); }
};
template <>
struct Wanted<double> {
  static constexpr const char* name = "a number";
  static bool fits(const nlohmann::json& v) { return v.is_number(); }
};

}  // namespace json_detail

// OBJECT[NAME] as T: std::string, bool, int64_t, uint64_t, double, or a
// std::vector / std::map<std::string, …> of one of those (each element is
// checked, and named as NAME[i] or NAME.key). FALLBACK if the field is absent
// (none: an error). WHERE (the file) leads every message.
template <class T>
Result<T> json_field(const nlohmann::json& object, const std::string& name, const std::string& where,
                     std::optional<T> fallback = std::nullopt);

namespace json_detail {

template <class T>
Result<T> value_as(const nlohmann::json& v, const std::string& name, const std::string& where) {
  if constexpr (requires { typename T::value_type; } && !std::is_same_v<T, std::string>) {
    T out;
    if constexpr (requires { typename T::mapped_type; }) {
      if (!v.is_object()) return make_error("{}: {} is {}, not an object", where, name, json_kind(v));
      for (const auto& [key, element] : v.items()) {
        SN_ASSIGN(auto value, value_as<typename T::mapped_type>(element, name + "." + key, where));
        out.emplace(key, std::move(value));
      }
    } else {
      if (!v.is_array()) return make_error("{}: {} is {}, not an array", where, name, json_kind(v));
      for (size_t i = 0; i < v.size(); ++i) {
        SN_ASSIGN(auto value, value_as<typename T::value_type>(v[i], fmt::format("{}[{}]", name, i), where));
        out.push_back(std::move(value));
      }
    }
    return out;
  } else {
    if (!Wanted<T>::fits(v)) return make_error("{}: {} is {}, not {}", where, name, json_kind(v), Wanted<T>::name);
    return v.get<T>();
  }
}

}  // namespace json_detail

template <class T>
Result<T> json_field(const nlohmann::json& object, const std::string& name, const std::string& where,
                     std::optional<T> fallback) {
  if (!object.is_object()) return make_error("{}: not a JSON object", where);
  const auto it = object.find(name);
  if (it == object.end()) {
    if (fallback) return std::move(*fallback);
    return make_error("{}: no field \"{}\"", where, name);
  }
  return json_detail::value_as<T>(*it, name, where);
}

}  // namespace sn::train
