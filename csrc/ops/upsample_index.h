// Index math of the fused top-down step, shared by the CPU and CUDA kernels
// (host and device), so the CPU tests exercise the CUDA kernels' arithmetic.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPN_HOST_DEVICE inline
#endif

namespace fpn_fast {

// Nearest resize along one axis, bit for bit as F.interpolate(size=..., mode="nearest"):
// scale = (float)in / (float)out;  src = min((int64)floorf((float)dst * scale), in - 1),
// with PyTorch's shortcuts for equal sizes and exact doubling (same values, cheaper).
struct NearestAxis {
  int64_t in_size;
  int64_t out_size;
  float scale;
};

FPN_HOST_DEVICE NearestAxis make_nearest_axis(int64_t in_size, int64_t out_size) {
  return NearestAxis{in_size, out_size, out_size > 0 ? (float)in_size / (float)out_size : 0.0f};
}

template <typename index_t>
FPN_HOST_DEVICE index_t nearest_source(const NearestAxis& axis, index_t dst) {
  if (axis.out_size == axis.in_size) return dst;
  if (axis.out_size == 2 * axis.in_size) return dst >> 1;
  const index_t src = static_cast<index_t>(floorf(static_cast<float>(dst) * axis.scale));
  const index_t last = static_cast<index_t>(axis.in_size - 1);
  return src < last ? src : last;
}

// The smallest dst in [0, out_size] whose source is >= src (out_size when none): the
// backward window of source index s is [first_dst_from(s), first_dst_from(s + 1)).
// The guess ceil(s * out / in) is corrected against nearest_source itself, so the window
// always agrees with the forward map (which is monotone) whatever the float rounding did.
template <typename index_t>
FPN_HOST_DEVICE index_t first_dst_from(const NearestAxis& axis, index_t src) {
  if (src <= 0) return 0;
  if (src >= axis.in_size) return static_cast<index_t>(axis.out_size);
  int64_t guess = (static_cast<int64_t>(src) * axis.out_size + axis.in_size - 1) / axis.in_size;
  index_t dst = static_cast<index_t>(guess < axis.out_size ? guess : axis.out_size);
  while (dst > 0 && nearest_source<index_t>(axis, dst - 1) >= src) --dst;
  while (dst < axis.out_size && nearest_source<index_t>(axis, dst) < src) ++dst;
  return dst;
}

// Offset of element (n, c, h, w) in a dense tensor of shape (., C, H, W), stored NCHW or,
// with channels_last, NHWC.
template <typename index_t>
FPN_HOST_DEVICE index_t dense_offset(index_t n, index_t c, index_t h, index_t w, index_t C, index_t H,
                                     index_t W, bool channels_last) {
  return channels_last ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// Inverse of dense_offset: the (n, c, h, w) of linear element i.
template <typename index_t>
FPN_HOST_DEVICE void dense_coords(index_t i, index_t C, index_t H, index_t W, bool channels_last, index_t& n,
                                  index_t& c, index_t& h, index_t& w) {
  if (channels_last) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

}  // namespace fpn_fast
