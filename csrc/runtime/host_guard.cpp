// The host-side guard of a cached plan: one C call that says whether anything a plan's Python
// guards read (fpn_fast/inference/guards.py) has changed since they last held.
//
// The Python guards compare, per call, each module's __dict__ with a snapshot, the types, the
// weights' identities, version counters and data pointers, and the global hook dicts: about 90 us
// of Python per call for ResNet50-FPN. They stay the definition of "the plan still applies"; this
// guard is a cache of their last success, armed (arm()) right before they run and kept only when
// they hold. A later call asks holds(): true only if nothing they read can have changed since:
//   * every dict they read (each module's __dict__, the dicts among its values: _modules, the
//     hook dicts, ...; the folded convolutions' _parameters; the global hook dicts) is unmodified.
//     On CPython >= 3.12 a dict watcher (PEP 699's successor API, PyDict_AddWatcher) bumps one
//     process-wide generation counter on any event of any watched dict, so this is one integer
//     compare; before 3.12 each dict's ma_version_tag (PEP 509: a new, globally unique value on
//     every modification) is compared with the one recorded at arming.
//   * what no dict event reports is read here directly: each module's type and the identity of its
//     __dict__, the content of list and set attributes (and of non-empty OrderedDicts, whose order
//     can change without a dict event), the called modules' training flag and hook counts, and each
//     guarded tensor's version counter (in-place writes) and data pointer (``.data =``).
// A change makes holds() false, the Python guards then decide (and rebuild the plan, or re-arm).
#include "runtime/host_guard.h"

#include <ATen/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <exception>
#include <unordered_map>
#include <cstdint>
#include <unordered_set>
#include <utility>
#include <vector>

namespace fpn_fast {
namespace {

#if PY_VERSION_HEX >= 0x030C0000
#define FPN_FAST_DICT_WATCHERS 1
std::atomic<uint64_t> generation{1};
int watcher_id = -1;
// How many live guards hold each watched dict (all under the GIL): a dict no guard holds any more
// is unwatched, so that a module which changes its attributes on every call (one a dropped CUDA
// graph used to hide) stops bumping the counter that every other guard compares.
std::unordered_map<PyObject*, size_t> watchers;

int on_dict_event(PyDict_WatchEvent, PyObject*, PyObject*, PyObject*) {
  generation.fetch_add(1, std::memory_order_relaxed);
  return 0;
}
#endif

constexpr const char* kCapsuleName = "fpn_fast.host_guard";

struct ContentCheck {
  PyObject* current;   // held: the container object a module's __dict__ held at arming
  PyObject* snapshot;  // held: the Python guard's copy of it
  bool empty;          // the snapshot is empty: a size check is the comparison
};

struct CalledCheck {
  PyObject* module;  // held
  PyTypeObject* type;
  PyObject* training;  // held
  Py_ssize_t hooks[2];  // hook_counts
};

// len(module._forward_hooks), len(module._forward_pre_hooks), as the Python guard's _call_state
// reads them. False with a Python error set where reading one raises.
bool hook_counts(PyObject* module, Py_ssize_t counts[2]) {
  const char* names[2] = {"_forward_hooks", "_forward_pre_hooks"};
  for (int i = 0; i < 2; ++i) {
    PyObject* hooks = PyObject_GetAttrString(module, names[i]);
    if (hooks == nullptr) return false;
    counts[i] = PyObject_Size(hooks);
    Py_DECREF(hooks);
    if (counts[i] < 0) return false;
  }
  return true;
}

struct TensorCheck {
  // held: the Python tensor, not its TensorImpl (a C++ reference would make torch.utils.swap_tensors,
  // which nn.Module._apply may use, refuse to swap it); read through it at each check.
  PyObject* tensor;
  int64_t version;  // -1: not checked (pointer only)
  void* pointer;
};

struct Guard {
  std::vector<PyObject*> held;  // references released on destruction
  std::vector<PyObject*> dicts;  // watched
  std::unordered_set<PyObject*> seen;
#ifdef FPN_FAST_DICT_WATCHERS
  uint64_t generation = 0;
#else
  std::vector<uint64_t> tags;
#endif
  std::vector<std::pair<PyObject*, PyTypeObject*>> types;  // module (held), its type (held)
  std::vector<std::pair<PyObject*, PyObject*>> own_dicts;  // module, its __dict__ (both held)
  std::vector<ContentCheck> contents;
  std::vector<CalledCheck> called;
  std::vector<TensorCheck> tensors;
  // The outer module (the backbone): held by neither pointer (it holds the engine that holds this
  // guard); holds() is given it and compares addresses before reading anything of it.
  PyObject* outer = nullptr;
  PyTypeObject* outer_type = nullptr;
  PyObject* outer_dict = nullptr;
  Py_ssize_t outer_size = 0;
#ifndef FPN_FAST_DICT_WATCHERS
  uint64_t outer_tag = 0;
#endif

  ~Guard() {
#ifdef FPN_FAST_DICT_WATCHERS
    for (PyObject* dict : dicts) {  // held, so alive: unwatch the ones no other guard holds
      auto found = watchers.find(dict);
      if (found != watchers.end() && --found->second == 0) {
        watchers.erase(found);
        if (PyDict_Unwatch(watcher_id, dict) < 0) PyErr_Clear();
      }
    }
#endif
    for (PyObject* object : held) Py_DECREF(object);
  }

  PyObject* hold(PyObject* object) {
    Py_INCREF(object);
    held.push_back(object);
    return object;
  }

  // Watch a dict: held, and its tag read now (3.11), before any of its values is read. `keep`
  // false: neither held nor counted (the outer module's, read through the module at each check;
  // on >= 3.12 it stays watched: its address may be reused once it dies, so it is never unwatched).
  // False with a Python error set where it cannot be watched.
  bool watch(PyObject* dict, bool keep = true) {
    if (!seen.insert(dict).second) return true;
#ifdef FPN_FAST_DICT_WATCHERS
    if (PyDict_Watch(watcher_id, dict) < 0) return false;
    if (!keep) return true;
    ++watchers[dict];
#else
    if (!keep) return true;
    tags.push_back(reinterpret_cast<PyDictObject*>(dict)->ma_version_tag);
#endif
    dicts.push_back(hold(dict));
    return true;
  }
};

// A module's instance __dict__ (new reference), or nullptr with an error set.
PyObject* dict_of(PyObject* object) {
  PyObject* dict = PyObject_GenericGetDict(object, nullptr);
  if (dict != nullptr && !PyDict_Check(dict)) {
    Py_DECREF(dict);
    PyErr_SetString(PyExc_TypeError, "a module's __dict__ is not a dict");
    return nullptr;
  }
  return dict;
}

Py_ssize_t container_size(PyObject* object) {
  if (PyDict_Check(object)) return PyDict_Size(object);
  if (PyList_Check(object)) return PyList_GET_SIZE(object);
  return PySet_Size(object);
}

// Record the values of one module's __dict__ as the StructureGuard compares them: the dicts among
// them are watched (a non-empty OrderedDict is also compared, for its order), lists, sets and
// other dict types are compared with the snapshot's copy; keys in `skip` are not read; keys in
// `by_identity` are compared by identity (watching `dict` covers that).
bool record_values(Guard& guard, PyObject* dict, PyObject* snapshot, PyObject* by_identity, PyObject* skip) {
  PyObject *key, *value;
  Py_ssize_t position = 0;
  while (PyDict_Next(dict, &position, &key, &value)) {
    if (skip != Py_None) {
      int skipped = PySet_Contains(skip, key);
      if (skipped < 0) return false;
      if (skipped) continue;
    }
    int identity = PySet_Contains(by_identity, key);
    if (identity < 0) return false;
    if (identity) continue;
    bool plain_dict = PyDict_CheckExact(value), ordered = PyODict_CheckExact(value);
    if ((plain_dict || ordered) && !guard.watch(value)) return false;
    // What a dict event does not show: a list's or set's content, another dict type's, and an
    // OrderedDict's order (move_to_end); an empty OrderedDict has no order to lose.
    bool compared = PyList_Check(value) || PySet_Check(value) ||
                    (PyDict_Check(value) && !plain_dict && !(ordered && PyDict_Size(value) == 0));
    if (!compared) continue;
    PyObject* copy = PyDict_GetItemWithError(snapshot, key);
    if (copy == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_KeyError, "a module attribute is not in the guard's snapshot");
      return false;
    }
    // For the built-in types, equal to an empty copy means empty.
    bool builtin = PyList_CheckExact(value) || PySet_CheckExact(value) || PyDict_CheckExact(value);
    bool empty = builtin && Py_TYPE(copy) == Py_TYPE(value) && container_size(copy) == 0;
    guard.contents.push_back({guard.hold(value), guard.hold(copy), empty});
  }
  return true;
}

// One (module, snapshot, by_identity) triple of a StructureGuard.
bool record_structure(Guard& guard, PyObject* entry) {
  PyObject *module, *snapshot, *by_identity;
  if (!PyArg_ParseTuple(entry, "OO!O!", &module, &PyDict_Type, &snapshot, &PyFrozenSet_Type, &by_identity)) {
    return false;
  }
  PyObject* dict = dict_of(module);
  if (dict == nullptr) return false;
  guard.own_dicts.emplace_back(guard.hold(module), guard.hold(dict));
  Py_DECREF(dict);
  guard.types.emplace_back(module, reinterpret_cast<PyTypeObject*>(guard.hold(reinterpret_cast<PyObject*>(Py_TYPE(module)))));
  return guard.watch(dict) && record_values(guard, dict, snapshot, by_identity, Py_None);
}

bool record_called(Guard& guard, PyObject* module) {
  PyObject* training = PyObject_GetAttrString(module, "training");
  if (training == nullptr) return false;
  guard.held.push_back(training);  // the new reference
  CalledCheck check{module, Py_TYPE(module), training, {0, 0}};
  if (!hook_counts(module, check.hooks)) return false;
  guard.hold(module);
  guard.called.push_back(check);
  guard.hold(reinterpret_cast<PyObject*>(Py_TYPE(module)));
  return true;
}

// A module's tensors in `slot` ("_parameters" or "_buffers"): `names` of them, or every one.
bool record_tensors(Guard& guard, PyObject* module, const char* slot, const char* const* names, bool versioned) {
  PyObject* dict = dict_of(module);
  if (dict == nullptr) return false;
  bool ok = guard.watch(dict);
  PyObject* tensors = ok ? PyDict_GetItemString(dict, slot) : nullptr;  // borrowed
  if (ok && (tensors == nullptr || !PyDict_Check(tensors))) {
    PyErr_Format(PyExc_TypeError, "a module's %s is not a dict", slot);
    ok = false;
  }
  if (ok) ok = guard.watch(tensors);
  Py_DECREF(dict);  // the watched dicts are held by the guard
  if (!ok) return false;
  std::vector<PyObject*> values;
  if (names != nullptr) {
    for (; *names != nullptr; ++names) {
      PyObject* value = PyDict_GetItemString(tensors, *names);
      if (value != nullptr) values.push_back(value);
    }
  } else {
    PyObject *key, *value;
    Py_ssize_t position = 0;
    while (PyDict_Next(tensors, &position, &key, &value)) values.push_back(value);
  }
  for (PyObject* value : values) {
    if (value == Py_None) continue;
    if (!THPVariable_Check(value)) {
      PyErr_SetString(PyExc_TypeError, "a module's parameter or buffer is not a tensor");
      return false;
    }
    const at::Tensor& tensor = THPVariable_Unpack(value);
    if (versioned && tensor.is_inference()) {
      PyErr_SetString(PyExc_ValueError, "an inference tensor has no version counter");
      return false;
    }
    // data_ptr(), as Python's Tensor.data_ptr() (which the Python guards compare): it materialises a
    // copy-on-write storage, where const_data_ptr() would not see the address move.
    guard.tensors.push_back({guard.hold(value), versioned ? tensor._version() : -1, tensor.data_ptr()});
  }
  return true;
}

bool record_outer(Guard& guard, PyObject* spec) {
  PyObject *outer, *snapshot, *by_identity, *ignored;
  if (!PyArg_ParseTuple(spec, "OO!O!O!", &outer, &PyDict_Type, &snapshot, &PyFrozenSet_Type, &by_identity,
                        &PyFrozenSet_Type, &ignored)) {
    return false;
  }
  PyObject* dict = dict_of(outer);
  if (dict == nullptr) return false;
  guard.outer = outer;
  guard.outer_type = Py_TYPE(outer);
  guard.outer_dict = dict;
  guard.outer_size = PyDict_Size(dict);
#ifndef FPN_FAST_DICT_WATCHERS
  guard.outer_tag = reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;  // before its values are read
#endif
  bool ok = guard.watch(dict, /*keep=*/false) && record_values(guard, dict, snapshot, by_identity, ignored);
  Py_DECREF(dict);  // not held: it holds the engine, which holds this guard
  return ok;
}

void destroy(PyObject* capsule) {
  delete static_cast<Guard*>(PyCapsule_GetPointer(capsule, kCapsuleName));
}

bool each(PyObject* list, bool (*record)(Guard&, PyObject*), Guard& guard) {
  PyObject* items = PySequence_Fast(list, "expected a sequence");
  if (items == nullptr) return false;
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PySequence_Fast_GET_SIZE(items); ++i) {
    ok = record(guard, PySequence_Fast_GET_ITEM(items, i));
  }
  Py_DECREF(items);
  return ok;
}

const char* const kWeightNames[] = {"weight", "bias", nullptr};

bool record_weights(Guard& guard, PyObject* module) {
  return record_tensors(guard, module, "_parameters", kWeightNames, /*versioned=*/true);
}

bool record_pointers(Guard& guard, PyObject* module) {
  return record_tensors(guard, module, "_parameters", nullptr, false) &&
         record_tensors(guard, module, "_buffers", nullptr, false);
}

bool record_dict(Guard& guard, PyObject* dict) {
  if (!PyDict_Check(dict)) {
    PyErr_SetString(PyExc_TypeError, "a watched object is not a dict");
    return false;
  }
  return guard.watch(dict);
}

// _guard_arm(structures, called, outer, weights, pointers, dicts) -> capsule
//   structures: [(module, snapshot of its __dict__, frozenset of keys compared by identity)]
//   called:     [module]: type, training and hook counts compared
//   outer:      (module, snapshot, by_identity, ignored keys) or None
//   weights:    [module]: _parameters' weight and bias, version counters and data pointers
//   pointers:   [module]: every parameter's and buffer's data pointer
//   dicts:      [dict]: watched as they are (the global hook dicts)
// Raises where something cannot be recorded (the caller then keeps the Python guards alone).
PyObject* guard_arm(PyObject*, PyObject* args) {
  PyObject *structures, *called, *outer, *weights, *pointers, *dicts;
  if (!PyArg_ParseTuple(args, "OOOOOO", &structures, &called, &outer, &weights, &pointers, &dicts)) return nullptr;
#ifdef FPN_FAST_DICT_WATCHERS
  if (watcher_id < 0) {
    watcher_id = PyDict_AddWatcher(on_dict_event);
    if (watcher_id < 0) return nullptr;
  }
#endif
  Guard* guard = nullptr;
  bool ok = false;
  try {
    guard = new Guard();
#ifdef FPN_FAST_DICT_WATCHERS
    guard->generation = generation.load(std::memory_order_relaxed);  // before anything is read
#endif
    ok = each(structures, record_structure, *guard) && each(called, record_called, *guard) &&
         (outer == Py_None || record_outer(*guard, outer)) && each(weights, record_weights, *guard) &&
         each(pointers, record_pointers, *guard) && each(dicts, record_dict, *guard);
  } catch (const std::exception& error) {  // c10::Error from a tensor (one without storage), bad_alloc
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, error.what());
  }
  if (!ok) {
    delete guard;
    return nullptr;
  }
  guard->seen.clear();
  PyObject* capsule = PyCapsule_New(guard, kCapsuleName, destroy);
  if (capsule == nullptr) delete guard;
  return capsule;
}

// An error raised while checking: an Exception means "changed" (as the Python guards' except
// Exception), anything else (KeyboardInterrupt) propagates.
int changed_or_error() {
  if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
  PyErr_Clear();
  return 0;
}

// 1: nothing recorded changed; 0: something may have; -1: an error to propagate.
int holds(const Guard& guard, PyObject* outer) {
#ifdef FPN_FAST_DICT_WATCHERS
  if (generation.load(std::memory_order_relaxed) != guard.generation) return false;
#else
  for (size_t i = 0; i < guard.dicts.size(); ++i) {
    if (reinterpret_cast<PyDictObject*>(guard.dicts[i])->ma_version_tag != guard.tags[i]) return false;
  }
#endif
  for (const auto& [module, type] : guard.types) {
    if (Py_TYPE(module) != type) return false;
  }
  for (const auto& [module, dict] : guard.own_dicts) {
    PyObject* current = PyObject_GenericGetDict(module, nullptr);
    if (current == nullptr) return changed_or_error();
    Py_DECREF(current);  // still held by the module
    if (current != dict) return false;
  }
  for (const ContentCheck& check : guard.contents) {
    if (check.empty) {
      if (container_size(check.current) != 0) return false;
      continue;
    }
    int equal = PyObject_RichCompareBool(check.current, check.snapshot, Py_EQ);
    if (equal != 1) return equal < 0 ? changed_or_error() : 0;  // one that raises: as the Python guard
  }
  for (const CalledCheck& check : guard.called) {
    if (Py_TYPE(check.module) != check.type) return false;
    PyObject* training = PyObject_GetAttrString(check.module, "training");
    if (training == nullptr) return changed_or_error();
    Py_DECREF(training);
    if (training != check.training) return false;
    Py_ssize_t counts[2];
    if (!hook_counts(check.module, counts)) return changed_or_error();
    if (counts[0] != check.hooks[0] || counts[1] != check.hooks[1]) return false;
  }
  try {
    for (const TensorCheck& check : guard.tensors) {
      const at::Tensor& tensor = THPVariable_Unpack(check.tensor);
      if (tensor.data_ptr() != check.pointer) return false;
      if (check.version >= 0 && tensor._version() != check.version) return false;
    }
  } catch (const std::exception&) {  // a tensor that changed kind (swapped with an inference tensor)
    return false;
  }
  if (guard.outer != nullptr) {
    if (outer != guard.outer || Py_TYPE(outer) != guard.outer_type) return false;
    PyObject* dict = PyObject_GenericGetDict(outer, nullptr);
    if (dict == nullptr) return changed_or_error();
    Py_DECREF(dict);  // still held by the outer module
    if (dict != guard.outer_dict || PyDict_Size(dict) != guard.outer_size) return false;
#ifndef FPN_FAST_DICT_WATCHERS
    if (reinterpret_cast<PyDictObject*>(dict)->ma_version_tag != guard.outer_tag) return false;
#endif
  }
  return true;
}

// _guard_holds(capsule, outer) -> bool
PyObject* guard_holds(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "_guard_holds(guard, outer) takes 2 arguments");
    return nullptr;
  }
  auto* guard = static_cast<Guard*>(PyCapsule_GetPointer(args[0], kCapsuleName));
  if (guard == nullptr) return nullptr;
  int result = holds(*guard, args[1]);
  return result < 0 ? nullptr : PyBool_FromLong(result);
}

// _guard_mechanism() -> str: how dict changes are seen.
PyObject* guard_mechanism(PyObject*, PyObject*) {
#ifdef FPN_FAST_DICT_WATCHERS
  return PyUnicode_FromString("dict watchers (one generation counter)");
#else
  return PyUnicode_FromString("dict version tags (PEP 509)");
#endif
}

}  // namespace

PyMethodDef host_guard_methods[] = {
    {"_guard_arm", guard_arm, METH_VARARGS,
     "_guard_arm(structures, called, outer, weights, pointers, dicts) -> guard (runtime/host_guard.cpp)"},
    {"_guard_holds", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(guard_holds)), METH_FASTCALL,
     "_guard_holds(guard, outer) -> bool: nothing the plan's guards read changed since arming"},
    {"_guard_mechanism", guard_mechanism, METH_NOARGS, "_guard_mechanism() -> str"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fpn_fast
