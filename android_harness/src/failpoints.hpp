// Kill points for crash tests, the same as runtime_driver/failpoints.py: PRGE_FAILPOINT=NAME[@STEP]
// makes the process SIGKILL itself there (a kill from outside rarely lands between two renames).
#pragma once

#include <string>

namespace prge {

void reached(const std::string& name, long step);

}  // namespace prge
