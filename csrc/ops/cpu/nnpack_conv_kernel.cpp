// NNPACK's Winograd 3x3 convolution (F(6x6, 3x3), "wt8x8"), called directly, for the FPN's output
// convolutions on large CPU maps.
//
// torch links NNPACK into libtorch_cpu and exposes it as aten::_nnpack_spatial_convolution, which
// runs it on NNPACK's own pthreadpool: right after an ATen op, those threads share the 2 cores
// with OpenMP's workers, which spin for a few milliseconds before they sleep, and the convolution
// runs ~30% slower. Here each of torch's intra-op (OpenMP) threads runs NNPACK single-threaded on
// its own slice of output channels, with its own workspace, so no second thread pool is involved,
// and from kernel transforms made once ahead (nnpack_pack_3x3) instead of on every call.
//
// The NNPACK functions are looked up at run time (dlsym): a torch built without NNPACK makes the
// ops report why they are unavailable instead of failing to load. The declarations follow
// NNPACK's public header (include/nnpack.h): enums passed as int, structs by value, same layout.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops/cpu/conv3x3_checks.h"

#include <dlfcn.h>

#include <cstddef>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace fpn_fast {
namespace {

struct NnpSize {
  size_t width;
  size_t height;
};
struct NnpPadding {
  size_t top;
  size_t right;
  size_t bottom;
  size_t left;
};

// Values from NNPACK's nnpack.h.
constexpr int kStatusSuccess = 0;
constexpr int kAlgorithmWt8x8 = 3;
constexpr int kStrategyPrecompute = 2;
constexpr int kStrategyReuse = 3;
constexpr int kActivationIdentity = 0;

using InitializeFn = int (*)();
using InferenceFn = int (*)(int algorithm, int transform_strategy, size_t input_channels, size_t output_channels,
                            NnpSize input_size, NnpPadding input_padding, NnpSize kernel_size,
                            NnpSize output_subsampling, const float* input, const float* kernel, const float* bias,
                            float* output, void* workspace_buffer, size_t* workspace_size, int activation,
                            const void* activation_parameters, void* threadpool, void* profile);

struct Nnpack {
  InferenceFn inference = nullptr;
  std::string error;
};

const Nnpack& nnpack() {
  static Nnpack lib;
  static std::once_flag once;
  std::call_once(once, [] {
    auto initialize = reinterpret_cast<InitializeFn>(dlsym(RTLD_DEFAULT, "nnp_initialize"));
    auto inference = reinterpret_cast<InferenceFn>(dlsym(RTLD_DEFAULT, "nnp_convolution_inference"));
    if (initialize == nullptr || inference == nullptr) {
      lib.error = "torch's library has no NNPACK symbols (built without NNPACK)";
    } else if (int status = initialize(); status != kStatusSuccess) {
      lib.error = "nnp_initialize failed with NNPACK status " + std::to_string(status) +
                  " (NNPACK needs x86-64 with AVX2 and FMA3, or ARM NEON)";
    } else {
      lib.inference = inference;
    }
  });
  return lib;
}

void check_status(int status, const char* what) {
  TORCH_CHECK(status == kStatusSuccess, "fpn_fast: NNPACK ", what, " failed with NNPACK status ", status);
}

// First output channel of slice s when K channels are split into `slices` parts.
int64_t slice_begin(int64_t K, int64_t slices, int64_t s) { return K * s / slices; }

NnpPadding padding_of(at::IntArrayRef padding) {
  const size_t ph = static_cast<size_t>(padding[0]), pw = static_cast<size_t>(padding[1]);
  return NnpPadding{ph, pw, ph, pw};
}

void check_weight(const char* name, const at::Tensor& weight) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
                   "fpn_fast::", name, ": weight must be a float32 CPU tensor, got ", weight.scalar_type(), " on ",
                   weight.device());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(0) > 0 &&
                        weight.size(1) > 0,
                    "fpn_fast::", name, ": weight must be [K, C, 3, 3], got ", weight.sizes());
}

std::string nnpack_unavailable_reason() { return nnpack().error; }

// Kernel transforms of weight [K, C, 3, 3], one per slice of output channels, for inputs of H x W
// pixels with this padding (uint8 buffers, 64-byte aligned like every ATen CPU allocation).
std::vector<at::Tensor> nnpack_pack_3x3(const at::Tensor& weight, int64_t H, int64_t W, at::IntArrayRef padding,
                                        int64_t slices) {
  const Nnpack& lib = nnpack();
  TORCH_CHECK(lib.inference != nullptr, "fpn_fast::nnpack_pack_3x3: ", lib.error);
  check_weight("nnpack_pack_3x3", weight);
  check_conv3x3_padding("nnpack_pack_3x3", padding);
  const int64_t K = weight.size(0), C = weight.size(1);
  TORCH_CHECK_VALUE(H > 0 && W > 0 && slices >= 1 && slices <= K, "fpn_fast::nnpack_pack_3x3: bad sizes (H=", H,
                    ", W=", W, ", slices=", slices, " for ", K, " output channels)");
  const at::Tensor kernel = weight.contiguous();
  const NnpSize input_size{static_cast<size_t>(W), static_cast<size_t>(H)};
  std::vector<at::Tensor> packed;
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t k0 = slice_begin(K, slices, s), k1 = slice_begin(K, slices, s + 1);
    size_t size = 0;
    check_status(lib.inference(kAlgorithmWt8x8, kStrategyPrecompute, C, k1 - k0, input_size, padding_of(padding),
                               NnpSize{3, 3}, NnpSize{1, 1}, nullptr, nullptr, nullptr, nullptr, nullptr, &size,
                               kActivationIdentity, nullptr, nullptr, nullptr),
                 "kernel transform size query");
    at::Tensor buffer = at::empty({static_cast<int64_t>(size)}, weight.options().dtype(at::kByte));
    check_status(lib.inference(kAlgorithmWt8x8, kStrategyPrecompute, C, k1 - k0, input_size, padding_of(padding),
                               NnpSize{3, 3}, NnpSize{1, 1}, nullptr, kernel.const_data_ptr<float>() + k0 * C * 9,
                               nullptr, nullptr, buffer.data_ptr(), &size, kActivationIdentity, nullptr, nullptr,
                               nullptr),
                 "kernel transform");
    packed.push_back(buffer);
  }
  return packed;
}

// The convolution of a contiguous float32 NCHW x, stride 1, from the slices' kernel transforms
// (nnpack_pack_3x3); the slices run on torch's intra-op threads. Returns (out [N, K, H', W']
// contiguous, finite): finite is false when an output is NaN, +-inf or beyond 1e30 in magnitude,
// where Winograd and the direct convolution part ways (the caller then runs the direct one).
std::tuple<at::Tensor, bool> nnpack_conv_3x3_packed(const at::Tensor& x, at::TensorList packed,
                                                    const std::optional<at::Tensor>& bias, int64_t K,
                                                    at::IntArrayRef padding) {
  const char* name = "nnpack_conv_3x3_packed";
  std::vector<const float*> kernels;
  for (const at::Tensor& p : packed) kernels.push_back(static_cast<const float*>(p.const_data_ptr()));
  const Nnpack& lib = nnpack();
  TORCH_CHECK(lib.inference != nullptr, "fpn_fast::", name, ": ", lib.error);
  TORCH_CHECK_VALUE(x.dim() == 4, "fpn_fast::", name, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && x.device().is_cpu(),
                   "fpn_fast::", name, ": x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(), "fpn_fast::", name, ": x must be contiguous (NCHW)");
  check_conv3x3_padding(name, padding);
  const int64_t slices = static_cast<int64_t>(kernels.size());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK_VALUE(slices >= 1 && slices <= K, "fpn_fast::", name, ": need 1..", K, " kernel slices, got ", slices);
  const int64_t Ho = H + 2 * padding[0] - 2, Wo = W + 2 * padding[1] - 2;
  TORCH_CHECK_VALUE(C > 0 && Ho > 0 && Wo > 0, "fpn_fast::", name, ": x ", x.sizes(), " is smaller than the 3x3 kernel");
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros({K}, x.options());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == K && b.scalar_type() == at::kFloat && b.device().is_cpu(),
                    "fpn_fast::", name, ": bias must be a float32 CPU tensor of ", K, " values, got ", b.sizes());
  at::Tensor out = at::empty({N, K, Ho, Wo}, x.options());
  if (N == 0) return {out, true};
  const NnpSize input_size{static_cast<size_t>(W), static_cast<size_t>(H)};
  const NnpPadding pad = padding_of(padding);
  // Each slice's workspace size (the query computes nothing), then one buffer per slice.
  std::vector<size_t> sizes(slices, 0);
  std::vector<at::Tensor> workspaces;
  for (int64_t s = 0; s < slices; ++s) {
    const int64_t k0 = slice_begin(K, slices, s), k1 = slice_begin(K, slices, s + 1);
    check_status(lib.inference(kAlgorithmWt8x8, kStrategyReuse, C, k1 - k0, input_size, pad, NnpSize{3, 3}, NnpSize{1, 1},
                               nullptr, nullptr, nullptr, nullptr, nullptr, &sizes[s], kActivationIdentity, nullptr,
                               nullptr, nullptr),
                 "workspace size query");
    workspaces.push_back(at::empty({static_cast<int64_t>(sizes[s])}, x.options().dtype(at::kByte)));
  }
  std::vector<int> status(slices, kStatusSuccess);
  std::vector<char> finite(slices, 1);
  const float* input = x.const_data_ptr<float>();
  const float* bias_data = b.const_data_ptr<float>();
  float* output = out.data_ptr<float>();
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t k0 = slice_begin(K, slices, s), k1 = slice_begin(K, slices, s + 1);
      for (int64_t n = 0; n < N && status[s] == kStatusSuccess; ++n) {
        size_t size = sizes[s];
        float* y = output + (n * K + k0) * Ho * Wo;
        status[s] = lib.inference(kAlgorithmWt8x8, kStrategyReuse, C, k1 - k0, input_size, pad, NnpSize{3, 3},
                                  NnpSize{1, 1}, input + n * C * H * W, kernels[s], bias_data + k0, y,
                                  workspaces[s].data_ptr(), &size, kActivationIdentity, nullptr, nullptr, nullptr);
        bool ok = true;  // NaN fails both comparisons
        for (int64_t i = 0, count = (k1 - k0) * Ho * Wo; i < count; ++i) ok &= (y[i] > -1e30f) & (y[i] < 1e30f);
        finite[s] = finite[s] && ok;
      }
    }
  });
  for (int64_t s = 0; s < slices; ++s) check_status(status[s], "convolution");
  bool all_finite = true;
  for (char f : finite) all_finite = all_finite && f != 0;
  return {out, all_finite};
}

}  // namespace
}  // namespace fpn_fast

// Registered for every dispatch key (as when they were declared from these functions); they
// refuse anything but float32 CPU tensors themselves.
TORCH_LIBRARY_IMPL(fpn_fast, CompositeImplicitAutograd, m) {
  m.impl("_nnpack_unavailable_reason", &fpn_fast::nnpack_unavailable_reason);
  m.impl("nnpack_pack_3x3", &fpn_fast::nnpack_pack_3x3);
  m.impl("nnpack_conv_3x3_packed", &fpn_fast::nnpack_conv_3x3_packed);
}
