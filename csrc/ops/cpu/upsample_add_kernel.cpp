// CPU kernels of the fused top-down step: one pass over the lateral map, parallel over
// rows (NCHW) or pixels (NHWC), inner loops written so the compiler vectorises them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/upsample_add_driver.h"
#include "ops/upsample_index.h"
#include "runtime/cpu/huge_pages.h"

namespace fpn_fast {
namespace {

// Elements handled per parallel task: large enough to amortise scheduling, small enough
// to balance 200x304 planes over the cores.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_for(int64_t inner) { return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(inner, 1)); }


// One NCHW output row: out[w] = (lateral[w] + b) + top[src(w)], evaluated in acc_t. In place
// (kInPlace) the lateral row is read through `out` itself, so the restrict promise holds and
// the compiler vectorises without a run-time overlap check.
template <typename scalar_t, typename acc_t, bool kBias, bool kInPlace>
inline void forward_row(scalar_t* __restrict__ out, const scalar_t* __restrict__ lateral_row,
                        const scalar_t* __restrict__ top, const int64_t* __restrict__ src_w, acc_t b, int64_t W,
                        int64_t top_w) {
  const scalar_t* lateral = kInPlace ? out : lateral_row;
  auto sum = [b](scalar_t l, scalar_t t) -> scalar_t {
    acc_t v = static_cast<acc_t>(l);
    if (kBias) v = v + b;
    return static_cast<scalar_t>(v + static_cast<acc_t>(t));
  };
  if (W == top_w) {
    for (int64_t w = 0; w < W; ++w) out[w] = sum(lateral[w], top[w]);
  } else if (W == 2 * top_w) {
    for (int64_t j = 0; j < top_w; ++j) {
      const scalar_t t = top[j];
      out[2 * j] = sum(lateral[2 * j], t);
      out[2 * j + 1] = sum(lateral[2 * j + 1], t);
    }
  } else {
    for (int64_t w = 0; w < W; ++w) out[w] = sum(lateral[w], top[src_w[w]]);
  }
}

template <typename scalar_t, bool kBias, bool kInPlace>
void forward_nchw(const UpsampleAddArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* out = static_cast<scalar_t*>(a.out);
  const auto* lateral = static_cast<const scalar_t*>(a.lateral);
  const auto* top = static_cast<const scalar_t*>(a.top);
  const auto* bias = static_cast<const scalar_t*>(a.bias);
  const NearestAxis axis_h = make_nearest_axis(a.top_h, a.H);
  const NearestAxis axis_w = make_nearest_axis(a.top_w, a.W);
  std::vector<int64_t> src_w(a.W);
  for (int64_t w = 0; w < a.W; ++w) src_w[w] = nearest_source<int64_t>(axis_w, w);
  at::parallel_for(0, a.N * a.C * a.H, grain_for(a.W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % a.H;
      const int64_t nc = row / a.H;
      const int64_t c = nc % a.C;
      const int64_t top_row = dense_offset<int64_t>(nc / a.C, c, nearest_source<int64_t>(axis_h, h), 0, a.C, a.top_h,
                                                    a.top_w, false);
      const acc_t b = kBias ? static_cast<acc_t>(bias[c]) : acc_t(0);
      forward_row<scalar_t, acc_t, kBias, kInPlace>(out + row * a.W, lateral + row * a.W, top + top_row,
                                                     src_w.data(), b, a.W, a.top_w);
    }
  });
}

template <typename scalar_t, bool kBias, bool kInPlace>
void forward_nhwc(const UpsampleAddArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* out = static_cast<scalar_t*>(a.out);
  const auto* lateral = static_cast<const scalar_t*>(a.lateral);
  const auto* top = static_cast<const scalar_t*>(a.top);
  std::vector<acc_t> bias(kBias ? a.C : 0);
  for (int64_t c = 0; kBias && c < a.C; ++c) bias[c] = static_cast<acc_t>(static_cast<const scalar_t*>(a.bias)[c]);
  const NearestAxis axis_h = make_nearest_axis(a.top_h, a.H);
  const NearestAxis axis_w = make_nearest_axis(a.top_w, a.W);
  const int64_t C = a.C;
  at::parallel_for(0, a.N * a.H * a.W, grain_for(C), [&](int64_t begin, int64_t end) {
    const acc_t* __restrict__ b = bias.data();
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t w = pixel % a.W;
      const int64_t nh = pixel / a.W;
      const int64_t h = nh % a.H;
      const scalar_t* __restrict__ t =
          top + dense_offset<int64_t>(nh / a.H, 0, nearest_source<int64_t>(axis_h, h),
                                      nearest_source<int64_t>(axis_w, w), C, a.top_h, a.top_w, true);
      scalar_t* __restrict__ o = out + pixel * C;
      const scalar_t* l = kInPlace ? o : lateral + pixel * C;  // in place: read through o itself
      for (int64_t c = 0; c < C; ++c) {
        acc_t v = static_cast<acc_t>(l[c]);
        if (kBias) v = v + b[c];
        o[c] = static_cast<scalar_t>(v + static_cast<acc_t>(t[c]));
      }
    }
  });
}

// Gather: each top element sums grad over its window, rows then columns in increasing
// order (the CUDA kernel sums in the same order, so both give the same bits).
template <typename scalar_t>
void backward_top_nchw(const UpsampleBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* grad_top = static_cast<scalar_t*>(a.grad_top);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  const NearestAxis axis_h = make_nearest_axis(a.top_h, a.H);
  const NearestAxis axis_w = make_nearest_axis(a.top_w, a.W);
  std::vector<int64_t> start_w(a.top_w + 1);
  for (int64_t s = 0; s <= a.top_w; ++s) start_w[s] = first_dst_from<int64_t>(axis_w, s);
  at::parallel_for(0, a.N * a.C * a.top_h, grain_for(a.W), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t sh = row % a.top_h;
      const int64_t nc = row / a.top_h;
      const int64_t h0 = first_dst_from<int64_t>(axis_h, sh);
      const int64_t h1 = first_dst_from<int64_t>(axis_h, sh + 1);
      const scalar_t* plane = grad + nc * a.H * a.W;
      scalar_t* out = grad_top + row * a.top_w;
      for (int64_t sw = 0; sw < a.top_w; ++sw) {
        acc_t acc = 0;
        for (int64_t h = h0; h < h1; ++h) {
          for (int64_t w = start_w[sw]; w < start_w[sw + 1]; ++w) acc += static_cast<acc_t>(plane[h * a.W + w]);
        }
        out[sw] = static_cast<scalar_t>(acc);
      }
    }
  });
}

template <typename scalar_t>
void backward_top_nhwc(const UpsampleBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  auto* grad_top = static_cast<scalar_t*>(a.grad_top);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  const NearestAxis axis_h = make_nearest_axis(a.top_h, a.H);
  const NearestAxis axis_w = make_nearest_axis(a.top_w, a.W);
  const int64_t C = a.C;
  at::parallel_for(0, a.N * a.top_h * a.top_w, grain_for(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t pixel = begin; pixel < end; ++pixel) {
      const int64_t sw = pixel % a.top_w;
      const int64_t nh = pixel / a.top_w;
      const int64_t sh = nh % a.top_h;
      const int64_t n = nh / a.top_h;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* __restrict__ sums = acc.data();
      const int64_t h1 = first_dst_from<int64_t>(axis_h, sh + 1);
      const int64_t w0 = first_dst_from<int64_t>(axis_w, sw);
      const int64_t w1 = first_dst_from<int64_t>(axis_w, sw + 1);
      for (int64_t h = first_dst_from<int64_t>(axis_h, sh); h < h1; ++h) {
        for (int64_t w = w0; w < w1; ++w) {
          const scalar_t* __restrict__ g = grad + dense_offset<int64_t>(n, 0, h, w, C, a.H, a.W, true);
          for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<acc_t>(g[c]);
        }
      }
      scalar_t* __restrict__ out = grad_top + pixel * C;
      for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(sums[c]);
    }
  });
}

template <typename scalar_t, bool kBias, bool kInPlace>
void forward_layout(const UpsampleAddArgs& a) {
  a.channels_last ? forward_nhwc<scalar_t, kBias, kInPlace>(a) : forward_nchw<scalar_t, kBias, kInPlace>(a);
}

template <typename scalar_t>
void dispatch_forward(const UpsampleAddArgs& a) {
  const bool in_place = a.out == a.lateral;
  if (a.bias) {
    in_place ? forward_layout<scalar_t, true, true>(a) : forward_layout<scalar_t, true, false>(a);
  } else {
    in_place ? forward_layout<scalar_t, false, true>(a) : forward_layout<scalar_t, false, false>(a);
  }
}

}  // namespace

void upsample_add_cpu_kernel(const UpsampleAddArgs& args) {
  if (args.out != args.lateral) {
    advise_huge_pages(args.out, args.N * args.C * args.H * args.W * c10::elementSize(args.dtype));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "fpn_fast::upsample_add (cpu)", [&] {
    dispatch_forward<scalar_t>(args);
  });
}

void upsample_add_backward_top_cpu_kernel(const UpsampleBackwardArgs& args) {
  advise_huge_pages(args.grad_top, args.N * args.C * args.top_h * args.top_w * c10::elementSize(args.dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.dtype, "fpn_fast::upsample_add_backward_top (cpu)",
                                  [&] {
                                    if (args.channels_last) {
                                      backward_top_nhwc<scalar_t>(args);
                                    } else {
                                      backward_top_nchw<scalar_t>(args);
                                    }
                                  });
}

namespace {

at::Tensor upsample_add_cpu(const at::Tensor& lateral, const at::Tensor& top, const std::optional<at::Tensor>& bias) {
  return upsample_add_driver(lateral, top, bias, &upsample_add_cpu_kernel);
}

void upsample_add_inplace_cpu(const at::Tensor& lateral, const at::Tensor& top, const std::optional<at::Tensor>& bias) {
  upsample_add_inplace_driver(lateral, top, bias, &upsample_add_cpu_kernel);
}

at::Tensor upsample_add_backward_top_cpu(const at::Tensor& grad, int64_t top_h, int64_t top_w) {
  return upsample_add_backward_top_driver(grad, top_h, top_w, &upsample_add_backward_top_cpu_kernel);
}

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, CPU, m) {
  m.impl("upsample_add", &fpn_fast::upsample_add_cpu);
  m.impl("upsample_add_", &fpn_fast::upsample_add_inplace_cpu);
  m.impl("upsample_add_backward_top", &fpn_fast::upsample_add_backward_top_cpu);
}
