// A minimal JSON reader (manifest.json, state.json, safetensors headers, metrics lines) and the
// few writing helpers the driver needs. Small on purpose: no third-party code on the device.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace prge {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Json {
 public:
  enum class Kind { Null, Bool, Number, String, Array, Object };

  static Json parse(const std::string& text);  // throws JsonError with a byte offset

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::Null; }
  bool is_number() const { return kind_ == Kind::Number; }
  bool is_string() const { return kind_ == Kind::String; }
  bool is_object() const { return kind_ == Kind::Object; }
  bool is_array() const { return kind_ == Kind::Array; }

  // Typed access; `what` names the value in the error message when the type is wrong.
  double number(const std::string& what) const;
  long long integer(const std::string& what) const;  // a number with no fractional part
  const std::string& string(const std::string& what) const;
  bool boolean(const std::string& what) const;
  const std::vector<Json>& array(const std::string& what) const;
  const std::map<std::string, Json>& object(const std::string& what) const;

  bool has(const std::string& key) const;
  // Member of an object; throws JsonError naming `key` when missing.
  const Json& at(const std::string& key) const;

  // Deep equality (numbers compared as doubles), for checkpoint fingerprints.
  bool operator==(const Json& other) const;
  bool operator!=(const Json& other) const { return !(*this == other); }

  // Compact serialization with Python json.dumps separators (", " and ": ").
  std::string dump() const;

  static Json make_number(double v);
  static Json make_string(std::string s);
  static Json make_null() { return Json(); }

 private:
  friend class JsonParser;
  Kind kind_ = Kind::Null;
  bool bool_ = false;
  double number_ = 0;
  bool integral_ = false;  // written without '.', 'e' (keeps integers printing as integers)
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
};

// Shortest round-trip text of a double, like Python's repr/json.dumps ("NaN" never written:
// callers write null for non-finite values, as the Python driver does).
std::string format_double(double v);
// A JSON string literal with the escapes JSON requires.
std::string quote(const std::string& s);

}  // namespace prge
