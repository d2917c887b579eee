// CUDA kernels of the fused top-down step. Only the light c10/ATen headers: nvcc on
// <torch/extension.h> takes minutes, and the op registration lives in a .cpp file.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "ops/upsample_add.h"
#include "ops/upsample_index.h"

namespace fpn_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerPack = 16;  // one 128-bit load/store per pack

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Each thread produces kVec consecutive outputs along the contiguous dimension (W for
// NCHW, C for NHWC); the launcher picks kVec > 1 only when that dimension is a multiple
// of kVec and the pointers are 16-byte aligned, so a pack never straddles a row.
template <typename scalar_t, typename index_t, int kVec, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    upsample_add_kernel(scalar_t* out, const scalar_t* lateral,  // may alias (in place): no __restrict__
                        const scalar_t* __restrict__ top, const scalar_t* __restrict__ bias, index_t packs, index_t C,
                        index_t H, index_t W, index_t top_h, index_t top_w, NearestAxis axis_h, NearestAxis axis_w) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t p = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs; p += stride) {
    const index_t first = p * kVec;
    index_t n, c, h, w;
    dense_coords<index_t>(first, C, H, W, kChannelsLast, n, c, h, w);
    const index_t sh = nearest_source<index_t>(axis_h, h);
    const P l = *reinterpret_cast<const P*>(lateral + first);
    P o;
    if (kChannelsLast) {
      const index_t sw = nearest_source<index_t>(axis_w, w);
      const P t = *reinterpret_cast<const P*>(top + dense_offset<index_t>(n, c, sh, sw, C, top_h, top_w, true));
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc_t v = static_cast<acc_t>(l.v[k]);
        if (bias != nullptr) v = v + static_cast<acc_t>(bias[c + k]);
        o.v[k] = static_cast<scalar_t>(v + static_cast<acc_t>(t.v[k]));
      }
    } else {
      const scalar_t* top_row = top + dense_offset<index_t>(n, c, sh, 0, C, top_h, top_w, false);
      const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc_t v = static_cast<acc_t>(l.v[k]);
        if (bias != nullptr) v = v + b;
        o.v[k] = static_cast<scalar_t>(v + static_cast<acc_t>(top_row[nearest_source<index_t>(axis_w, w + k)]));
      }
    }
    *reinterpret_cast<P*>(out + first) = o;
  }
}

// Gather: one thread per top element sums grad over its window, rows then columns in
// increasing order, as the CPU kernel does.
template <typename scalar_t, typename index_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
    upsample_backward_top_kernel(scalar_t* __restrict__ grad_top, const scalar_t* __restrict__ grad, index_t total,
                                 index_t C, index_t H, index_t W, index_t top_h, index_t top_w, NearestAxis axis_h,
                                 NearestAxis axis_w) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    index_t n, c, sh, sw;
    dense_coords<index_t>(i, C, top_h, top_w, kChannelsLast, n, c, sh, sw);
    const index_t h1 = first_dst_from<index_t>(axis_h, sh + 1);
    const index_t w0 = first_dst_from<index_t>(axis_w, sw);
    const index_t w1 = first_dst_from<index_t>(axis_w, sw + 1);
    acc_t acc = 0;
    for (index_t h = first_dst_from<index_t>(axis_h, sh); h < h1; ++h) {
      for (index_t w = w0; w < w1; ++w) {
        acc += static_cast<acc_t>(grad[dense_offset<index_t>(n, c, h, w, C, H, W, kChannelsLast)]);
      }
    }
    grad_top[i] = static_cast<scalar_t>(acc);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kBytesPerPack == 0; }

// 32-bit indices when every index (and a grid stride past the end) fits.
bool fits_int32(int64_t numel) { return numel <= INT_MAX / 2; }

unsigned int blocks_for(int64_t work) {
  constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks)));
}

template <typename scalar_t, typename index_t, int kVec, bool kChannelsLast>
void launch_forward(const UpsampleAddArgs& a, cudaStream_t stream) {
  const int64_t numel = a.N * a.C * a.H * a.W;
  const index_t packs = static_cast<index_t>(numel / kVec);
  upsample_add_kernel<scalar_t, index_t, kVec, kChannelsLast><<<blocks_for(packs), kThreads, 0, stream>>>(
      static_cast<scalar_t*>(a.out), static_cast<const scalar_t*>(a.lateral), static_cast<const scalar_t*>(a.top),
      static_cast<const scalar_t*>(a.bias), packs, a.C, a.H, a.W, a.top_h, a.top_w, make_nearest_axis(a.top_h, a.H),
      make_nearest_axis(a.top_w, a.W));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t>
void forward_by_layout(const UpsampleAddArgs& a, cudaStream_t stream) {
  constexpr int kVec = kBytesPerPack / sizeof(scalar_t);
  const int64_t inner = a.channels_last ? a.C : a.W;
  // bias is read one element at a time, so its alignment does not matter.
  const bool vectorise = inner % kVec == 0 && aligned16(a.out) && aligned16(a.lateral) &&
                         (!a.channels_last || aligned16(a.top));
  if (a.channels_last) {
    vectorise ? launch_forward<scalar_t, index_t, kVec, true>(a, stream)
              : launch_forward<scalar_t, index_t, 1, true>(a, stream);
  } else {
    vectorise ? launch_forward<scalar_t, index_t, kVec, false>(a, stream)
              : launch_forward<scalar_t, index_t, 1, false>(a, stream);
  }
}

template <typename scalar_t, typename index_t>
void backward_by_layout(const UpsampleBackwardArgs& a, cudaStream_t stream) {
  const int64_t total = a.N * a.C * a.top_h * a.top_w;
  const NearestAxis axis_h = make_nearest_axis(a.top_h, a.H), axis_w = make_nearest_axis(a.top_w, a.W);
  auto* grad_top = static_cast<scalar_t*>(a.grad_top);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  if (a.channels_last) {
    upsample_backward_top_kernel<scalar_t, index_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
        grad_top, grad, total, a.C, a.H, a.W, a.top_h, a.top_w, axis_h, axis_w);
  } else {
    upsample_backward_top_kernel<scalar_t, index_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
        grad_top, grad, total, a.C, a.H, a.W, a.top_h, a.top_w, axis_h, axis_w);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void upsample_add_cuda_kernel(const UpsampleAddArgs& args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = fits_int32(args.N * args.C * args.H * args.W) &&
                     fits_int32(args.N * args.C * args.top_h * args.top_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "fpn_fast::upsample_add (cuda)", [&] {
    small ? forward_by_layout<scalar_t, int32_t>(args, stream) : forward_by_layout<scalar_t, int64_t>(args, stream);
  });
}

void upsample_add_backward_top_cuda_kernel(const UpsampleBackwardArgs& args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool small = fits_int32(args.N * args.C * args.H * args.W) &&
                     fits_int32(args.N * args.C * args.top_h * args.top_w);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "fpn_fast::upsample_add_backward_top (cuda)",
                                  [&] {
                                    small ? backward_by_layout<scalar_t, int32_t>(args, stream)
                                          : backward_by_layout<scalar_t, int64_t>(args, stream);
                                  });
}

}  // namespace fpn_fast
