// Fused OSNet aggregation gate (one pass over the four streams), NCHW:
//   g_t = sigmoid(W2 relu(W1 GAP(x_t) + b1) + b2),   y = sum_{t=1..4} x_t * g_t  (channel-wise).
//
// What it fuses: per stream, PyTorch eager runs global average pool, fc1, ReLU, fc2, sigmoid and a
// broadcast multiply, then three adds combine the streams: ~21 passes over one activation tensor.
// Here the pooling is already done: the producer of each stream (the last depthwise LiteConv,
// `depthwise_liteconv_sums_*`) wrote s_t[n, c] = sum over H x W of x_t in FP32, so the gate reads
// x_1..x_4 once and writes y once: 5 passes.
//
// Bytes per output element: reads 4 * sizeof(T), writes sizeof(T); plus, per CTA, the 4 * C sums of
// its sample and the MLP weights (a few KB, L2-resident). FP32 accumulation; y is rounded once.
//
// Why this tiling: the MLP mixes all channels of a sample, so it needs the sums of every channel, but
// it is tiny (4 streams x 2 x C x C/16 MACs, ~4K for the largest OSNet stage). Instead of a second
// kernel or a grid-wide barrier (no cooperative launch in TensorRT AOT plugins), each CTA recomputes
// the hidden layer for its sample (one warp per (stream, hidden unit) dot product, lane-strided, then a
// butterfly: fixed order, deterministic) and the gates of its own channels only. A CTA then streams
// `channels_per_cta` whole (n, c) planes of the four inputs; the planes of one sample are contiguous in
// NCHW, so that is one contiguous range per input, read with 16-byte (FP32) / 8-byte (FP16) vector
// loads, four loads in flight per thread (one per stream). The host chooses channels_per_cta so one CTA
// moves tens of KB (amortising the MLP prologue) while the grid still fills the GPU at small N.
// W1 is passed as the module holds it (not pre-scaled): the kernel scales the dot product by
// 1 / (H * W) from its own int32 dims, so the weights do not depend on the input resolution.
//
// Contract (TensorRT AOT plugin ready): one kernel per launch; parameters are the input pointers
// (x1..x4 [N, C, H, W] of T, s1..s4 [N, C] FP32, W1 [C/r, C], b1 [C/r], W2 [C, C/r], b2 [C], all FP32),
// then int32 scalars (N, C, hidden = C/r, H, W, channels_per_cta), then the output pointer (y, T).
// blockDim.x must be a multiple of 32 and <= 256; gridDim.x == N * ceil(C / channels_per_cta);
// hidden <= 128 and channels_per_cta <= 64 (shared-memory tables). Anything else traps. y must not
// alias any x_t. Header-free (FP16 as unsigned short, PTX `cvt`) so NVRTC needs no include path.

namespace osnet_gate {

typedef unsigned long long u64;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kStreams = 4;
constexpr int kMaxThreads = 256;
constexpr int kMaxHidden = 128;
constexpr int kMaxChannelsPerCta = 64;

struct alignas(16) Vec16 {  // 4 x FP32
  unsigned int u[4];
};

struct alignas(8) Vec8 {  // 4 x FP16
  unsigned int u[2];
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  typedef Vec16 Vec;
  static constexpr int kVec = 4;
  static constexpr u64 kAlign = 16;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
  __device__ static void unpack(const Vec16& r, float* out) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = __uint_as_float(r.u[k]);
  }
  __device__ static Vec16 pack(const float* in) {
    Vec16 r;
#pragma unroll
    for (int k = 0; k < 4; ++k) r.u[k] = __float_as_uint(in[k]);
    return r;
  }
};

template <>
struct Elem<unsigned short> {
  typedef Vec8 Vec;
  static constexpr int kVec = 4;
  static constexpr u64 kAlign = 8;
  __device__ static float to_float(unsigned short v) { return half_bits_to_float(v); }
  __device__ static unsigned short from_float(float v) { return float_to_half_bits(v); }
  __device__ static void unpack(const Vec8& r, float* out) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // little-endian: lower address in the low half
      out[2 * k] = half_bits_to_float(static_cast<unsigned short>(r.u[k] & 0xffffu));
      out[2 * k + 1] = half_bits_to_float(static_cast<unsigned short>(r.u[k] >> 16));
    }
  }
  __device__ static Vec8 pack(const float* in) {
    Vec8 r;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      r.u[k] = static_cast<unsigned int>(float_to_half_bits(in[2 * k])) |
               (static_cast<unsigned int>(float_to_half_bits(in[2 * k + 1])) << 16);
    }
    return r;
  }
};

// Walks the CTA's `count` items (vectors or elements) of `per_plane` items per plane, strided by
// blockDim.x, tracking (plane, offset) incrementally: one division at the start, none in the loop.
struct PlaneCursor {
  int plane;
  int offset;
  int step_planes;
  int step_offset;
  int per_plane;
  __device__ PlaneCursor(int per_plane_items) : per_plane(per_plane_items) {
    const int t = static_cast<int>(threadIdx.x);
    const int stride = static_cast<int>(blockDim.x);
    plane = t / per_plane;
    offset = t - plane * per_plane;
    step_planes = stride / per_plane;
    step_offset = stride - step_planes * per_plane;
  }
  __device__ void advance() {
    offset += step_offset;
    plane += step_planes;
    if (offset >= per_plane) {
      offset -= per_plane;
      ++plane;
    }
  }
};

template <typename T>
__device__ __forceinline__ void gate_launch(const T* __restrict__ x1, const T* __restrict__ x2,
                                            const T* __restrict__ x3, const T* __restrict__ x4,
                                            const float* __restrict__ s1, const float* __restrict__ s2,
                                            const float* __restrict__ s3, const float* __restrict__ s4,
                                            const float* __restrict__ fc1_weight, const float* __restrict__ fc1_bias,
                                            const float* __restrict__ fc2_weight, const float* __restrict__ fc2_bias,
                                            int n, int c, int hidden, int h, int w, int channels_per_cta,
                                            T* __restrict__ y) {
  __shared__ float hidden_act[kStreams][kMaxHidden];
  __shared__ float gates[kStreams][kMaxChannelsPerCta];

  const bool shape_ok = n >= 1 && c >= 1 && h >= 1 && w >= 1 && static_cast<long long>(h) * w <= 2147483647ll &&
                        hidden >= 1 && hidden <= kMaxHidden &&
                        channels_per_cta >= 1 && channels_per_cta <= kMaxChannelsPerCta;
  const bool block_ok = blockDim.x % 32 == 0 && blockDim.x <= kMaxThreads && blockDim.y == 1 && blockDim.z == 1;
  const int groups = shape_ok ? (c + channels_per_cta - 1) / channels_per_cta : 1;
  const bool grid_ok = static_cast<long long>(gridDim.x) == static_cast<long long>(n) * groups &&
                       gridDim.y == 1 && gridDim.z == 1;
  if (!(shape_ok && block_ok && grid_ok)) asm volatile("trap;");  // never produced by kernels/launch.py

  const int sample = static_cast<int>(blockIdx.x) / groups;
  const int c_begin = (static_cast<int>(blockIdx.x) - sample * groups) * channels_per_cta;
  const int c_count = imin(channels_per_cta, c - c_begin);
  const int hw = h * w;  // checked above: fits in int32
  const float inv_hw = 1.0f / static_cast<float>(hw);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int warps = static_cast<int>(blockDim.x) >> 5;

  // Hidden layer of the MLP for this sample, all 4 streams: one warp per (stream, unit) dot product.
  for (int job = warp; job < kStreams * hidden; job += warps) {  // warp-uniform: shuffles are safe
    const int t = job / hidden;
    const int j = job - t * hidden;
    const float* s = (t == 0 ? s1 : t == 1 ? s2 : t == 2 ? s3 : s4) + static_cast<u64>(sample) * c;
    const float* w1 = fc1_weight + static_cast<u64>(j) * c;
    float acc = 0.0f;
    for (int k = lane; k < c; k += 32) acc = fmaf(w1[k], s[k], acc);
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(kFullMask, acc, offset);
    if (lane == 0) {
      const float z = fmaf(acc, inv_hw, fc1_bias[j]);  // W1 . (sums / HW) + b1
      hidden_act[t][j] = z < 0.0f ? 0.0f : z;
    }
  }
  __syncthreads();

  // Gates of this CTA's channels.
  for (int job = static_cast<int>(threadIdx.x); job < kStreams * c_count; job += static_cast<int>(blockDim.x)) {
    const int t = job / c_count;
    const int cc = job - t * c_count;
    const float* w2 = fc2_weight + static_cast<u64>(c_begin + cc) * hidden;
    float z = fc2_bias[c_begin + cc];
    for (int j = 0; j < hidden; ++j) z = fmaf(w2[j], hidden_act[t][j], z);
    gates[t][cc] = 1.0f / (1.0f + expf(-z));
  }
  __syncthreads();

  // Stream the CTA's planes: y = x1 * g1 + x2 * g2 + x3 * g3 + x4 * g4.
  const u64 base = (static_cast<u64>(sample) * c + c_begin) * static_cast<u64>(hw);
  const u64 addresses = reinterpret_cast<u64>(x1) | reinterpret_cast<u64>(x2) | reinterpret_cast<u64>(x3) |
                        reinterpret_cast<u64>(x4) | reinterpret_cast<u64>(y);
  constexpr int V = Elem<T>::kVec;
  if (hw % V == 0 && (addresses & (Elem<T>::kAlign - 1ull)) == 0) {
    typedef typename Elem<T>::Vec Vec;
    PlaneCursor cursor(hw / V);
    for (; cursor.plane < c_count; cursor.advance()) {
      const u64 i = base + static_cast<u64>(cursor.plane) * hw + static_cast<u64>(cursor.offset) * V;
      const Vec r1 = *reinterpret_cast<const Vec*>(x1 + i);
      const Vec r2 = *reinterpret_cast<const Vec*>(x2 + i);
      const Vec r3 = *reinterpret_cast<const Vec*>(x3 + i);
      const Vec r4 = *reinterpret_cast<const Vec*>(x4 + i);
      const float g1 = gates[0][cursor.plane];
      const float g2 = gates[1][cursor.plane];
      const float g3 = gates[2][cursor.plane];
      const float g4 = gates[3][cursor.plane];
      float acc[V];
      float v[V];
      Elem<T>::unpack(r1, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = v[k] * g1;
      Elem<T>::unpack(r2, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], g2, acc[k]);
      Elem<T>::unpack(r3, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], g3, acc[k]);
      Elem<T>::unpack(r4, v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = fmaf(v[k], g4, acc[k]);
      *reinterpret_cast<Vec*>(y + i) = Elem<T>::pack(acc);
    }
  } else {  // odd H * W or unaligned pointers: same walk, one element at a time
    PlaneCursor cursor(hw);
    for (; cursor.plane < c_count; cursor.advance()) {
      const u64 i = base + static_cast<u64>(cursor.plane) * hw + static_cast<u64>(cursor.offset);
      const float v1 = Elem<T>::to_float(x1[i]);
      const float v2 = Elem<T>::to_float(x2[i]);
      const float v3 = Elem<T>::to_float(x3[i]);
      const float v4 = Elem<T>::to_float(x4[i]);
      float acc = v1 * gates[0][cursor.plane];
      acc = fmaf(v2, gates[1][cursor.plane], acc);
      acc = fmaf(v3, gates[2][cursor.plane], acc);
      acc = fmaf(v4, gates[3][cursor.plane], acc);
      y[i] = Elem<T>::from_float(acc);
    }
  }
}

}  // namespace osnet_gate

extern "C" __global__ void __launch_bounds__(256, 4)
    aggregation_gate_f32(const float* __restrict__ x1, const float* __restrict__ x2, const float* __restrict__ x3,
                         const float* __restrict__ x4, const float* __restrict__ s1, const float* __restrict__ s2,
                         const float* __restrict__ s3, const float* __restrict__ s4,
                         const float* __restrict__ fc1_weight, const float* __restrict__ fc1_bias,
                         const float* __restrict__ fc2_weight, const float* __restrict__ fc2_bias, int n, int c,
                         int hidden, int h, int w, int channels_per_cta, float* __restrict__ y) {
  osnet_gate::gate_launch<float>(x1, x2, x3, x4, s1, s2, s3, s4, fc1_weight, fc1_bias, fc2_weight, fc2_bias, n, c,
                                 hidden, h, w, channels_per_cta, y);
}

extern "C" __global__ void __launch_bounds__(256, 4)
    aggregation_gate_f16(const unsigned short* __restrict__ x1, const unsigned short* __restrict__ x2,
                         const unsigned short* __restrict__ x3, const unsigned short* __restrict__ x4,
                         const float* __restrict__ s1, const float* __restrict__ s2, const float* __restrict__ s3,
                         const float* __restrict__ s4, const float* __restrict__ fc1_weight,
                         const float* __restrict__ fc1_bias, const float* __restrict__ fc2_weight,
                         const float* __restrict__ fc2_bias, int n, int c, int hidden, int h, int w,
                         int channels_per_cta, unsigned short* __restrict__ y) {
  osnet_gate::gate_launch<unsigned short>(x1, x2, x3, x4, s1, s2, s3, s4, fc1_weight, fc1_bias, fc2_weight,
                                          fc2_bias, n, c, hidden, h, w, channels_per_cta, y);
}
