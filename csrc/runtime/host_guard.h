// The host-side guard of a cached plan (runtime/host_guard.cpp): the Python functions it adds to
// the fpn_fast._C module (schemas.cpp puts them in the module's method table).
#pragma once
#include <Python.h>

namespace fpn_fast {
// {"_guard_arm", ...}, {"_guard_holds", ...}, {"_guard_mechanism", ...}, then a zero entry.
extern PyMethodDef host_guard_methods[];
}  // namespace fpn_fast
