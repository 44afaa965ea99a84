#include "json.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace prge {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json document() {
    Json v = value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 64;  // manifests nest 4 deep; bound the recursion anyway
  const std::string& s_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& msg) const {
    throw JsonError("invalid JSON at byte " + std::to_string(pos_) + ": " + msg);
  }
  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *c) fail(std::string("expected '") + word + "'");
  }

  Json value(int depth) {
    if (depth > kMaxDepth) fail("nested too deeply");
    Json v;
    char c = peek();
    if (c == '{') {
      v.kind_ = Json::Kind::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = string_literal();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        v.object_[key] = value(depth + 1);
        char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.kind_ = Json::Kind::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array_.push_back(value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.kind_ = Json::Kind::String;
      v.string_ = string_literal();
    } else if (c == 't') {
      expect("true"); v.kind_ = Json::Kind::Bool; v.bool_ = true;
    } else if (c == 'f') {
      expect("false"); v.kind_ = Json::Kind::Bool; v.bool_ = false;
    } else if (c == 'n') {
      expect("null");
    } else if (c == 'N') {
      expect("NaN"); v.kind_ = Json::Kind::Number; v.number_ = NAN;  // Python writes it for nan
    } else {
      number(v);
    }
    return v;
  }

  void number(Json& v) {
    size_t start = pos_;
    if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
    bool integral = true, digits = false;
    while (pos_ < s_.size()) {
      char c = s_[pos_];
      if (c >= '0' && c <= '9') { digits = true; ++pos_; }
      else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; ++pos_; }
      else break;
    }
    if (!digits) fail("expected a value");
    std::string text = s_.substr(start, pos_ - start);
    char* end = nullptr;
    double d = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size()) fail("malformed number '" + text + "'");
    v.kind_ = Json::Kind::Number;
    v.number_ = d;
    v.integral_ = integral;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) out += char(cp);
    else if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); }
    else if (cp < 0x10000) { out += char(0xE0 | (cp >> 12)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
    else { out += char(0xF0 | (cp >> 18)); out += char(0x80 | ((cp >> 12) & 0x3F)); out += char(0x80 | ((cp >> 6) & 0x3F)); out += char(0x80 | (cp & 0x3F)); }
  }
  unsigned hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = s_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }
  std::string string_literal() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && pos_ + 6 <= s_.size() && s_[pos_] == '\\' && s_[pos_ + 1] == 'u') {
            pos_ += 2;
            unsigned lo = hex4();
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }
};

Json Json::parse(const std::string& text) { return JsonParser(text).document(); }

static const char* kind_name(Json::Kind k) {
  switch (k) {
    case Json::Kind::Null: return "null";
    case Json::Kind::Bool: return "a boolean";
    case Json::Kind::Number: return "a number";
    case Json::Kind::String: return "a string";
    case Json::Kind::Array: return "an array";
    case Json::Kind::Object: return "an object";
  }
  return "?";
}

static JsonError type_error(const std::string& what, const char* expected, Json::Kind got) {
  return JsonError(what + ": expected " + expected + ", got " + kind_name(got));
}

double Json::number(const std::string& what) const {
  if (kind_ != Kind::Number) throw type_error(what, "a number", kind_);
  return number_;
}
long long Json::integer(const std::string& what) const {
  double d = number(what);
  if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15) throw JsonError(what + ": expected an integer");
  return static_cast<long long>(d);
}
const std::string& Json::string(const std::string& what) const {
  if (kind_ != Kind::String) throw type_error(what, "a string", kind_);
  return string_;
}
bool Json::boolean(const std::string& what) const {
  if (kind_ != Kind::Bool) throw type_error(what, "a boolean", kind_);
  return bool_;
}
const std::vector<Json>& Json::array(const std::string& what) const {
  if (kind_ != Kind::Array) throw type_error(what, "an array", kind_);
  return array_;
}
const std::map<std::string, Json>& Json::object(const std::string& what) const {
  if (kind_ != Kind::Object) throw type_error(what, "an object", kind_);
  return object_;
}
bool Json::has(const std::string& key) const { return kind_ == Kind::Object && object_.count(key) > 0; }
const Json& Json::at(const std::string& key) const {
  if (kind_ != Kind::Object) throw JsonError("expected an object holding '" + key + "'");
  auto it = object_.find(key);
  if (it == object_.end()) throw JsonError("missing key '" + key + "'");
  return it->second;
}

bool Json::operator==(const Json& o) const {
  if (kind_ != o.kind_) return false;
  switch (kind_) {
    case Kind::Null: return true;
    case Kind::Bool: return bool_ == o.bool_;
    case Kind::Number: return number_ == o.number_;
    case Kind::String: return string_ == o.string_;
    case Kind::Array: return array_ == o.array_;
    case Kind::Object: return object_ == o.object_;
  }
  return false;
}

Json Json::make_number(double v) {
  Json j;
  j.kind_ = Kind::Number;
  j.number_ = v;
  j.integral_ = std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15;
  return j;
}
Json Json::make_string(std::string s) {
  Json j;
  j.kind_ = Kind::String;
  j.string_ = std::move(s);
  return j;
}

std::string format_double(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, res.ptr);
  // Python prints floats with a '.', or an exponent: 0.0 and 3.0, not 0 and 3.
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += char(c);  // UTF-8 passes through (Python would escape it; both parse the same)
        }
    }
  }
  return out + "\"";
}

std::string Json::dump() const {
  switch (kind_) {
    case Kind::Null: return "null";
    case Kind::Bool: return bool_ ? "true" : "false";
    case Kind::Number: {
      if (integral_) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(number_));
        return buf;
      }
      return format_double(number_);
    }
    case Kind::String: return quote(string_);
    case Kind::Array: {
      std::string out = "[";
      for (size_t i = 0; i < array_.size(); ++i) out += (i ? ", " : "") + array_[i].dump();
      return out + "]";
    }
    case Kind::Object: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : object_) {
        out += (first ? "" : ", ") + quote(k) + ": " + v.dump();
        first = false;
      }
      return out + "}";
    }
  }
  return "null";
}

}  // namespace prge
