// Winograd F(4x4, 3x3) convolution for float32 CPU maps in NHWC.
//
// A 3x3, stride-1 convolution computed tile by tile (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2016, section 4.2, the F(4x4, 3x3) matrices B^T, G, A^T with
// interpolation points 0, +-1, +-2 and infinity): each 4x4 block of output pixels is
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// for its 6x6 input tile d and each 3x3 kernel g, "." elementwise. The 36 elementwise products,
// summed over input channels, are 36 independent matrix products (tiles x C) @ (C x K), run
// here as one oneDNN grouped 1x1 convolution with 36 groups over the kernel transforms G g G^T,
// which fpn_fast/ops/_winograd.py makes once per convolution (in float64, rounded once) and
// prepacks. winograd_conv_3x3 runs the three steps on chunks of tiles, so each chunk's
// transformed input and products stay in cache:
//   input transform:  x [N, C, H, W] channels_last -> V, memory [tiles][36][C]
//   tuple products:   V -> M, memory [tiles][36][K] (oneDNN)
//   output transform: M -> y [N, K, Ho, Wo] (+ bias, ReLU), NHWC or NCHW
// The transforms vectorise across channels, which NHWC keeps contiguous: every transform is the
// same few adds and multiplies applied to a run of channels. 4x fewer multiplications than the
// direct convolution (36 per 16 outputs instead of 144). It rounds differently: ~1e-5 of the
// output's largest value from float64 on random data (6e-6 to 1.4e-5 measured; oneDNN's direct
// convolution ~1.5e-6), as NNPACK's F(6x6, 3x3).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "ops/cpu/conv3x3_checks.h"
#include "runtime/cpu/huge_pages.h"

// Compiled for AVX-512, AVX2 + FMA and the baseline, picked at load time (GCC / clang ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FPN_FAST_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FPN_FAST_VECTOR_CLONES
#endif

namespace fpn_fast {
namespace {

constexpr int64_t kTile = 6;     // input tile side (alpha = m + r - 1)
constexpr int64_t kOut = 4;      // output block side (m)
constexpr int64_t kPoints = 36;  // kTile * kTile
constexpr int64_t kBlock = 64;   // channels transformed together (a run the compiler vectorises)

// B^T z for one 6-vector of channel runs: out[r][0:n] = sum_k BT[r][k] * z[k][0:n], written with
// the matrix's zeros and ones folded in. `stride` separates z's (and out's) six entries.
__attribute__((always_inline)) inline void input_rows(const float* __restrict__ z, int64_t zs, float* __restrict__ out, int64_t os, int64_t n) {
  const float *z0 = z, *z1 = z + zs, *z2 = z + 2 * zs, *z3 = z + 3 * zs, *z4 = z + 4 * zs, *z5 = z + 5 * zs;
  float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os, *o4 = out + 4 * os, *o5 = out + 5 * os;
  for (int64_t l = 0; l < n; ++l) {
    const float a = z1[l], b = z2[l], c = z3[l], d = z4[l];
    o0[l] = 4.0f * z0[l] - 5.0f * b + d;
    o1[l] = -4.0f * (a + b) + (c + d);
    o2[l] = 4.0f * (a - b) + (d - c);
    o3[l] = 2.0f * (c - a) + (d - b);
    o4[l] = 2.0f * (a - c) + (d - b);
    o5[l] = 4.0f * a - 5.0f * c + z5[l];
  }
}

// A^T m for one 6-vector of channel runs: out[r][0:n] for the 4 rows of A^T.
__attribute__((always_inline)) inline void output_rows(const float* __restrict__ m, int64_t ms, float* __restrict__ out, int64_t os, int64_t n) {
  const float *m0 = m, *m1 = m + ms, *m2 = m + 2 * ms, *m3 = m + 3 * ms, *m4 = m + 4 * ms, *m5 = m + 5 * ms;
  float *o0 = out, *o1 = out + os, *o2 = out + 2 * os, *o3 = out + 3 * os;
  for (int64_t l = 0; l < n; ++l) {
    const float s12 = m1[l] + m2[l], d12 = m1[l] - m2[l], s34 = m3[l] + m4[l], d34 = m3[l] - m4[l];
    o0[l] = m0[l] + s12 + s34;
    o1[l] = d12 + 2.0f * d34;
    o2[l] = s12 + 4.0f * s34;
    o3[l] = d12 + 8.0f * d34 + m5[l];
  }
}

struct Geometry {
  int64_t N, C, H, W, ph, pw, Ho, Wo, tiles_h, tiles_w;
  int64_t tiles() const { return N * tiles_h * tiles_w; }
};

Geometry geometry(int64_t N, int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw) {
  Geometry g{N, C, H, W, ph, pw, H + 2 * ph - 2, W + 2 * pw - 2, 0, 0};
  g.tiles_h = (g.Ho + kOut - 1) / kOut;
  g.tiles_w = (g.Wo + kOut - 1) / kOut;
  return g;
}

// V[t - base][p][c] for tiles [t0, t1): the 6x6 input tile (zeros outside the map) through B^T . B.
FPN_FAST_VECTOR_CLONES
void input_transform(const float* x, float* v, const Geometry g, int64_t base, int64_t t0, int64_t t1) {
  alignas(64) float d[kPoints * kBlock];
  alignas(64) float t[kPoints * kBlock];
  const int64_t per_image = g.tiles_h * g.tiles_w;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
    const int64_t r0 = i * kOut - g.ph, c0 = j * kOut - g.pw;
    const float* image = x + n * g.H * g.W * g.C;
    float* out = v + (tile - base) * kPoints * g.C;
    const bool interior = r0 >= 0 && c0 >= 0 && r0 + kTile <= g.H && c0 + kTile <= g.W;
    for (int64_t cb = 0; cb < g.C; cb += kBlock) {
      const int64_t n_c = std::min(kBlock, g.C - cb);
      // Rows of the tile through B^T, straight from the map when the tile lies inside it.
      if (interior) {
        for (int64_t col = 0; col < kTile; ++col) {
          input_rows(image + (r0 * g.W + c0 + col) * g.C + cb, g.W * g.C, t + col * kBlock, kTile * kBlock, n_c);
        }
      } else {
        for (int64_t r = 0; r < kTile; ++r) {
          for (int64_t col = 0; col < kTile; ++col) {
            float* dst = d + (r * kTile + col) * kBlock;
            const int64_t y = r0 + r, xx = c0 + col;
            if (y >= 0 && y < g.H && xx >= 0 && xx < g.W) {
              const float* src = image + (y * g.W + xx) * g.C + cb;
              for (int64_t l = 0; l < n_c; ++l) dst[l] = src[l];
            } else {
              for (int64_t l = 0; l < n_c; ++l) dst[l] = 0.0f;
            }
          }
        }
        for (int64_t col = 0; col < kTile; ++col) {
          input_rows(d + col * kBlock, kTile * kBlock, t + col * kBlock, kTile * kBlock, n_c);
        }
      }
      // Then each row's six columns through B, into V's 36 points.
      for (int64_t r = 0; r < kTile; ++r) {
        input_rows(t + r * kTile * kBlock, kBlock, out + r * kTile * g.C + cb, g.C, n_c);
      }
    }
  }
}

// y for tiles [t0, t1) from m[t - base]: each tile's 36 points through A^T . A, plus bias, ReLU;
// the 4x4 block cropped to the map. Returns false when an output (before the ReLU) is NaN, +-inf or beyond 1e30
// in magnitude.
FPN_FAST_VECTOR_CLONES
bool output_transform(const float* m, const float* bias, float* y, const Geometry g, int64_t K, bool relu,
                      bool channels_last, int64_t base, int64_t t0, int64_t t1) {
  alignas(64) float t[kOut * kTile * kBlock];
  alignas(64) float o[kOut * kOut * kBlock];
  const int64_t per_image = g.tiles_h * g.tiles_w;
  bool finite = true;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n = tile / per_image, i = (tile % per_image) / g.tiles_w, j = tile % g.tiles_w;
    const int64_t rows = std::min(kOut, g.Ho - i * kOut), cols = std::min(kOut, g.Wo - j * kOut);
    const float* in = m + (tile - base) * kPoints * K;
    for (int64_t kb = 0; kb < K; kb += kBlock) {
      const int64_t n_k = std::min(kBlock, K - kb);
      // Columns through A^T (t[r][col]), then rows through A (o[r][s]).
      for (int64_t col = 0; col < kTile; ++col) {
        output_rows(in + col * K + kb, kTile * K, t + col * kBlock, kTile * kBlock, n_k);
      }
      for (int64_t r = 0; r < kOut; ++r) {
        output_rows(t + r * kTile * kBlock, kBlock, o + r * kOut * kBlock, kBlock, n_k);
      }
      bool ok = true;
      for (int64_t p = 0; p < kOut * kOut; ++p) {
        float* op = o + p * kBlock;
        for (int64_t l = 0; l < n_k; ++l) {
          const float value = op[l] + bias[kb + l];
          ok &= (value > -1e30f) & (value < 1e30f);  // NaN fails both
          op[l] = relu ? std::max(value, 0.0f) : value;
        }
      }
      finite = finite && ok;
      if (channels_last) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t s = 0; s < cols; ++s) {
            float* dst = y + ((n * g.Ho + i * kOut + r) * g.Wo + j * kOut + s) * K + kb;
            const float* src = o + (r * kOut + s) * kBlock;
            for (int64_t l = 0; l < n_k; ++l) dst[l] = src[l];
          }
        }
      } else {
        for (int64_t l = 0; l < n_k; ++l) {
          float* plane = y + ((n * K + kb + l) * g.Ho + i * kOut) * g.Wo + j * kOut;
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t s = 0; s < cols; ++s) plane[r * g.Wo + s] = o[(r * kOut + s) * kBlock + l];
          }
        }
      }
    }
  }
  return finite;
}

// Tiles per parallel task of a transform: enough work to amortise the task, few enough to
// balance 2-16 threads.
constexpr int64_t kGrain = 8;

// oneDNN's grouped 1x1 convolution, the 36 matrix products: m = v (x) packed, groups = 36.
at::Tensor tuple_products(const at::Tensor& v, const at::Tensor& packed) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
  const std::vector<int64_t> zero{0, 0}, one{1, 1};
  torch::jit::Stack stack{v,      packed,           c10::IValue(), zero, one, one, int64_t(kPoints), std::string("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// F.conv2d(x, weight, bias, stride 1, padding) [then ReLU] for a float32 channels_last x
// [N, C, H, W] and a 3x3 weight given as its kernel transforms: `packed` is the [36 * K, C, 1, 1]
// weight of the 36-group 1x1 convolution (row p * K + k holds (G g_k G^T)[p] over the C input
// channels), dense or prepacked for oneDNN.
//
// The products run on [groups, 36 * C, group, 1] batches: `group` tiles per batch entry, the
// last entry padded with zero tiles. oneDNN picks its weight layout from the spatial size, so a
// fixed spatial size (the one `packed` was reordered for) is what keeps every call on the
// prepacked layout whatever the map's size (a mismatch costs a reorder of the whole weight per
// call: 36x slower, measured); the batch size does not change the layout. Batches of at most
// `chunk` tiles (a multiple of `group`), so each batch's transformed input and products stay in
// cache between the three steps.
//
// Returns (y [N, K, Ho, Wo] channels_last or contiguous NCHW, finite): finite is false when an
// output before the ReLU is NaN, +-inf or beyond 1e30 in magnitude, where Winograd and the direct
// convolution part ways (an inf in a tile becomes NaN across the tile's outputs); the caller then
// runs the direct one.
std::tuple<at::Tensor, bool> winograd_conv_3x3(const at::Tensor& x, const at::Tensor& packed,
                                               const std::optional<at::Tensor>& bias, int64_t K,
                                               at::IntArrayRef padding, bool relu, bool channels_last, int64_t group,
                                               int64_t chunk) {
  const char* name = "winograd_conv_3x3";
  TORCH_CHECK_VALUE(x.dim() == 4, "fpn_fast::", name, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && x.device().is_cpu(),
                   "fpn_fast::", name, ": x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK_VALUE(x.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "fpn_fast::", name, ": x must be channels_last (NHWC), got strides ", x.strides());
  check_conv3x3_padding(name, padding);
  const Geometry g = geometry(x.size(0), x.size(1), x.size(2), x.size(3), padding[0], padding[1]);
  TORCH_CHECK_VALUE(g.C > 0 && g.Ho > 0 && g.Wo > 0, "fpn_fast::", name, ": x ", x.sizes(),
                    " is smaller than the 3x3 kernel or has no channels");
  TORCH_CHECK_VALUE(K > 0 && group > 0 && chunk >= group && chunk % group == 0, "fpn_fast::", name,
                    ": out_channels and group must be positive and chunk a positive multiple of group, got ", K, ", ",
                    group, " and ", chunk);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kFloat && packed.device().is_cpu(),
                   "fpn_fast::", name, ": packed must be a float32 CPU tensor, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 4 && packed.size(0) == kPoints * K && packed.size(1) == g.C &&
                        packed.size(2) == 1 && packed.size(3) == 1,
                    "fpn_fast::", name, ": packed must be [36 * ", K, ", ", g.C, ", 1, 1] for x ", x.sizes(), ", got ",
                    packed.sizes());
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::zeros({K}, x.options());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == K && b.scalar_type() == at::kFloat && b.device().is_cpu(),
                    "fpn_fast::", name, ": bias must be a float32 CPU tensor of ", K, " values, got ", b.sizes());
  at::Tensor y = at::empty({g.N, K, g.Ho, g.Wo}, x.options().memory_format(
                                                      channels_last ? at::MemoryFormat::ChannelsLast
                                                                    : at::MemoryFormat::Contiguous));
  if (g.N == 0) return {y, true};
  advise_huge_pages(y.data_ptr(), y.nbytes());
  const float* src = x.const_data_ptr<float>();
  const float* bias_data = b.const_data_ptr<float>();
  float* dst = y.data_ptr<float>();
  const int64_t tiles = g.tiles();
  const int64_t padded = tiles + (group - tiles % group) % group, step = std::min(chunk, padded);
  at::Tensor v = at::empty({step / group, kPoints * g.C, group, 1},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  std::atomic<bool> finite{true};
  for (int64_t base = 0; base < padded; base += step) {
    const int64_t count = std::min(step, padded - base), real = std::min(count, tiles - base);
    at::Tensor v_chunk = count == step ? v : v.narrow(0, 0, count / group);
    float* v_data = v_chunk.data_ptr<float>();
    at::parallel_for(base, base + real, kGrain,
                     [&](int64_t begin, int64_t end) { input_transform(src, v_data, g, base, begin, end); });
    if (real < count) {  // the last group's padding: zero tiles (their products are never read)
      std::fill(v_data + real * kPoints * g.C, v_data + count * kPoints * g.C, 0.0f);
    }
    const at::Tensor m = tuple_products(v_chunk, packed);
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 4 && m.size(0) == count / group &&
                    m.size(1) == kPoints * K && m.size(2) == group && m.is_contiguous(at::MemoryFormat::ChannelsLast),
                "fpn_fast::", name, ": oneDNN's grouped convolution gave ", m.sizes(), " with strides ", m.strides(),
                ", expected channels_last [", count / group, ", ", kPoints * K, ", ", group, ", 1]");
    const float* m_data = m.const_data_ptr<float>();
    at::parallel_for(base, base + real, kGrain, [&](int64_t begin, int64_t end) {
      if (!output_transform(m_data, bias_data, dst, g, K, relu, channels_last, base, begin, end)) finite = false;
    });
  }
  return {y, finite.load()};
}

}  // namespace
}  // namespace fpn_fast

// Registered for every dispatch key (as when it was declared from this function); it refuses
// anything but float32 CPU tensors itself.
TORCH_LIBRARY_IMPL(fpn_fast, CompositeImplicitAutograd, m) {
  m.impl("winograd_conv_3x3", &fpn_fast::winograd_conv_3x3);
}
