// The extension module fpn_fast._C and the declarations of every fpn_fast op: the one
// TORCH_LIBRARY block below holds all the schemas. Kernels register elsewhere, by op and
// dispatch key, with TORCH_LIBRARY_IMPL only:
//
//   upsample_add, upsample_add_, upsample_add_backward_top
//       ops/upsample_add.{h,cpp}, ops/upsample_add_driver.h  device-independent host code
//       ops/upsample_index.h                                 index math (host and device)
//       ops/cpu/upsample_add_kernel.cpp                      CPU
//       ops/cuda/upsample_add_kernel.cu, ops/cuda/upsample_add_registration.cpp   CUDA
//       ops/autograd/upsample_add_kernel.cpp                 Autograd (upsample_add_)
//   nhwc_to_nchw
//       ops/cpu/nhwc_to_nchw_kernel.cpp, ops/cuda/nhwc_to_nchw_kernel.cpp,
//       ops/autograd/nhwc_to_nchw_kernel.cpp
//   winograd_conv_3x3                                        ops/cpu/winograd_conv_kernel.cpp
//   nnpack_pack_3x3, nnpack_conv_3x3_packed, _nnpack_unavailable_reason
//                                                            ops/cpu/nnpack_conv_kernel.cpp
//   _upsample_add_index_probe, _nearest_window_starts (test hooks)   ops/upsample_add.cpp
//   _cpu_pool_* (the CPU buffer pool)                        runtime/cpu/memory_pool.cpp
// and, not ops, the module's functions _guard_arm/_guard_holds   runtime/host_guard.cpp
//
// The Python side (fpn_fast/ops/_extension.py and others) calls these by name, and registers
// there the fake (meta) kernels of the tensor ops and the autograd formulas of upsample_add and
// upsample_add_backward_top.
#include <Python.h>
#include <torch/library.h>

#include "runtime/host_guard.h"

// Importing fpn_fast._C runs the static registrations of every file in csrc/; the module's own
// functions are the plans' host-side guard (runtime/host_guard.cpp).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fpn_fast::host_guard_methods};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fpn_fast, m) {
  // The FPN's fused top-down step: out = (lateral + bias[c]) + nearest_upsample(top).
  m.def("upsample_add(Tensor lateral, Tensor top, Tensor? bias) -> Tensor");
  m.def("upsample_add_(Tensor(a!) lateral, Tensor top, Tensor? bias) -> ()");
  m.def("upsample_add_backward_top(Tensor grad, SymInt top_h, SymInt top_w) -> Tensor");
  // Layout: an NHWC tensor's values in a new NCHW-contiguous tensor.
  m.def("nhwc_to_nchw(Tensor x) -> Tensor");
  // 3x3 convolutions for CPU inference: the extension's Winograd F(4x4, 3x3), and NNPACK's.
  m.def("winograd_conv_3x3(Tensor x, Tensor packed, Tensor? bias, int out_channels, int[2] padding, bool relu, "
        "bool channels_last, int group, int chunk) -> (Tensor, bool)");
  m.def("nnpack_pack_3x3(Tensor weight, int H, int W, int[2] padding, int slices) -> Tensor[]");
  m.def("nnpack_conv_3x3_packed(Tensor x, Tensor[] packed, Tensor? bias, int out_channels, int[2] padding) -> "
        "(Tensor, bool)");
  m.def("_nnpack_unavailable_reason() -> str");
  // Test hooks of the upsample index math. Their schemas are the ones torch inferred when they
  // were declared from their C++ functions (argument names _0.., conservative alias analysis),
  // kept as they were.
  m.def(torch::schema("_upsample_add_index_probe(int[] _0, int[] _1, bool _2, int _3) -> int[] _0",
                      c10::AliasAnalysisKind::CONSERVATIVE));
  m.def(torch::schema("_nearest_window_starts(int _0, int _1) -> int[] _0", c10::AliasAnalysisKind::CONSERVATIVE));
  // The CPU buffer pool (runtime/cpu/memory_pool.cpp; fpn_fast/ops/cpu_cache.py drives it).
  m.def("_cpu_pool_enter() -> bool");
  m.def("_cpu_pool_exit() -> ()");
  m.def("_cpu_pool_set_limit(int limit_bytes) -> int");
  m.def("_cpu_pool_release() -> int");
  m.def("_cpu_pool_stats() -> int[]");
}
