#include "failpoints.hpp"

#include <csignal>
#include <cstdlib>

namespace prge {

void reached(const std::string& name, long step) {
  const char* spec = std::getenv("PRGE_FAILPOINT");
  if (!spec || !*spec) return;
  std::string s = spec, at;
  auto sign = s.find('@');
  if (sign != std::string::npos) {
    at = s.substr(sign + 1);
    s = s.substr(0, sign);
  }
  if (s == name && (at.empty() || std::to_string(step) == at)) std::raise(SIGKILL);
}

}  // namespace prge
