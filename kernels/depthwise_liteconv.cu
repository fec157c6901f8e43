// Fused depthwise LiteConv for OSNet: y = relu(dwconv3x3(x, w') + b'), stride 1, pad 1, NCHW.
//
// What it fuses: the 3x3 depthwise convolution, the eval-mode BatchNorm (folded on the host into
// w' = w * gamma / sqrt(var + eps) and b' = beta - mean * gamma / sqrt(var + eps)) and the ReLU of
// OSNet's Lite 3x3. PyTorch eager runs them as three kernels (conv, BN, ReLU): 3 reads + 3 writes of
// the activation. The `_sums` entry points also write the FP32 spatial sum of y per (n, c) plane,
// which is what the aggregation gate's global average pool needs, so the gate never re-reads a
// stream just to pool it.
//
// Bytes per output element: reads sizeof(T) from DRAM (each input row is loaded by the one walker
// owning it; the two halo rows of a band are re-read by the neighbouring band's walker and come from
// L2), writes sizeof(T); the `_sums` variant adds 4 bytes per (n, c) plane. FP32 accumulation.
//
// Why this tiling: a warp is cut into walkers of `lanes_per_row` (G, a power of two <= 32) lanes. A
// walker covers G * 4 contiguous columns of one plane, so each lane does one vector load per row (16
// bytes in FP32, 8 in FP16; 8-wide FP16 strips cost ~110 registers and spilled under the occupancy
// bound below), and walks down a band of rows keeping the 3-row window in registers: every input
// element is loaded once and reused for the 3 output rows that need it. Left/right neighbours
// come from the adjacent lanes by warp shuffle (no shared-memory halo tile, no bank conflicts, no
// __syncthreads in the main loop); only when a row is wider than one walker (W > G * S) do the chunk
// edge lanes fetch their outer neighbour from global memory. Rows are fetched 4 at a time, so every
// lane has four vector loads in flight; __launch_bounds__(256, 3) caps registers at 80 (no spills),
// so 768 threads per SM keep 24-48 KB of loads in flight, above the ~18 KB/SM an H100 needs at
// 3 TB/s. The host picks the band height from N (more, shorter bands when the batch is small) so the
// grid still fills the GPU. A CTA owns whole (n, c) planes (`planes_per_cta` of them), so the
// per-plane sum is reduced inside the CTA in a fixed order: no atomics, no memset, bitwise
// deterministic for a given launch configuration. W not a multiple of 4, or pointers not aligned to
// the vector size, take the same walk with element-wise loads and stores.
//
// Contract (TensorRT AOT plugin ready): one kernel per launch; parameters are the input pointers
// (x, then the folded weight [C, 9] and bias [C], always FP32), then int32 scalars (dims, then the
// tiling chosen by kernels/launch.py: lanes_per_row, bands_per_plane, planes_per_cta), then the output
// pointers (y, and sums [N, C] FP32 for `_sums`). blockDim.x must be a multiple of 32 and <= 256,
// gridDim.x == ceil(N * C / planes_per_cta). A launch that breaks these traps (a loud launch error,
// never silently wrong output). y must not alias x. Header-free on purpose: FP16 is carried as
// unsigned short and converted with PTX `cvt`, so NVRTC compiles this file with no include path.

namespace osnet_dw {

typedef unsigned long long u64;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 256;
constexpr int kRowsPerStep = 4;  // kernels/launch.py's ROWS_PER_STEP mirrors this

struct alignas(16) Vec16 {  // 4 x FP32
  unsigned int u[4];
};

struct alignas(8) Vec8 {  // 4 x FP16
  unsigned int u[2];
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ReLU that propagates NaN like torch.relu (a NaN compares false and passes through).
__device__ __forceinline__ float relu(float v) { return v < 0.0f ? 0.0f : v; }

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

// Storage type T <-> FP32, and 16-byte packing. kStrip = elements per 16 bytes.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  typedef Vec16 Vec;
  static constexpr int kStrip = 4;
  static constexpr unsigned long long kAlign = 16;
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
  static constexpr int kStrip = 4;
  static constexpr unsigned long long kAlign = 8;
  __device__ static float to_float(unsigned short v) { return half_bits_to_float(v); }
  __device__ static unsigned short from_float(float v) { return float_to_half_bits(v); }
  __device__ static void unpack(const Vec8& r, float* out) {
    // Little-endian: the element at the lower address is in the low half of each word.
#pragma unroll
    for (int k = 0; k < 2; ++k) {
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

// kRowsPerStep input strips of one lane, loaded before any is used so their loads overlap.
template <typename T, bool kVec>
struct RowStrips;

template <typename T>
struct RowStrips<T, true> {  // vector path: `cols` is 0 or kStrip here (W % kStrip == 0).
  typedef typename Elem<T>::Vec Vec;
  static constexpr int kWords = static_cast<int>(sizeof(Vec) / 4);
  Vec raw[kRowsPerStep];
  __device__ void load(int k, const T* src, int cols) {
    if (cols > 0) {
      raw[k] = *reinterpret_cast<const Vec*>(src);
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) raw[k].u[i] = 0u;
    }
  }
  __device__ void to_float(int k, float* out) const { Elem<T>::unpack(raw[k], out); }
};

template <typename T>
struct RowStrips<T, false> {  // element-wise path: odd W or unaligned pointers.
  T raw[kRowsPerStep][Elem<T>::kStrip];
  __device__ void load(int k, const T* src, int cols) {
#pragma unroll
    for (int j = 0; j < Elem<T>::kStrip; ++j) raw[k][j] = j < cols ? src[j] : T(0);
  }
  __device__ void to_float(int k, float* out) const {
#pragma unroll
    for (int j = 0; j < Elem<T>::kStrip; ++j) out[j] = Elem<T>::to_float(raw[k][j]);
  }
};

template <typename T, bool kVec>
__device__ __forceinline__ void store_strip(T* dst, const float* values, int cols) {
  constexpr int S = Elem<T>::kStrip;
  if (kVec) {
    *reinterpret_cast<typename Elem<T>::Vec*>(dst) = Elem<T>::pack(values);
  } else {
#pragma unroll
    for (int j = 0; j < S; ++j) {
      if (j < cols) dst[j] = Elem<T>::from_float(values[j]);
    }
  }
}

// Number of column chunks a row is cut into: one chunk = one walker's G * S columns.
__device__ __forceinline__ int chunks_per_row(int w, int lanes_per_row, int strip) {
  const int chunk_cols = lanes_per_row * strip;
  return (w + chunk_cols - 1) / chunk_cols;
}

template <typename T, bool kSums, bool kVec>
__device__ __forceinline__ void depthwise_walk(const T* __restrict__ x, const float* __restrict__ weight,
                                               const float* __restrict__ bias, int n, int c, int h, int w,
                                               int lanes_per_row, int bands_per_plane, int planes_per_cta,
                                               T* __restrict__ y, float* __restrict__ sums,
                                               float* walker_sums) {
  constexpr int S = Elem<T>::kStrip;
  const int g = lanes_per_row;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int sub = lane & (g - 1);  // strip index inside the walker
  const int walker = warp * (32 / g) + lane / g;
  const int chunk_cols = g * S;
  const int chunks = chunks_per_row(w, g, S);
  const int units = chunks * bands_per_plane;  // walkers per plane
  const int plane_local = walker / units;
  const int unit = walker - plane_local * units;
  const int chunk = unit / bands_per_plane;
  const int band = unit - chunk * bands_per_plane;
  const long long planes = static_cast<long long>(n) * c;
  const long long plane = static_cast<long long>(blockIdx.x) * planes_per_cta + plane_local;
  const bool active = plane_local < planes_per_cta && plane < planes;
  const int band_rows = (h + bands_per_plane - 1) / bands_per_plane;
  const int row_begin = band * band_rows;
  const int row_end = imin(h, row_begin + band_rows);  // exclusive
  const int col0 = chunk * chunk_cols + sub * S;
  const int cols = active ? imax(0, imin(S, w - col0)) : 0;  // valid columns of this lane's strip
  const int channel = active ? static_cast<int>(plane % c) : 0;

  float wk[9];
#pragma unroll
  for (int i = 0; i < 9; ++i) wk[i] = weight[channel * 9 + i];
  const float b = bias[channel];

  const u64 plane_offset = active ? static_cast<u64>(plane) * static_cast<u64>(h) * static_cast<u64>(w) : 0ull;
  const T* xp = x + plane_offset;  // offsets inside a plane fit in int32: the host checks H * W < 2^31
  T* yp = y + plane_offset;

  // Window: rows o-1 (`up`) and o (`mid`); index 0 and S+1 hold the left/right neighbours.
  float up[S + 2];
  float mid[S + 2];
#pragma unroll
  for (int j = 0; j < S + 2; ++j) {
    up[j] = 0.0f;
    mid[j] = 0.0f;
  }
  float lane_sum = 0.0f;

  // Input rows row_begin-1 .. row_end (inclusive); the trip count depends only on band_rows, so it is
  // the same for every lane of the CTA and the shuffles below always see a converged warp.
  const int steps = (band_rows + 2 + kRowsPerStep - 1) / kRowsPerStep;
  for (int step = 0; step < steps; ++step) {
    const int q0 = row_begin - 1 + step * kRowsPerStep;
    RowStrips<T, kVec> strips;
#pragma unroll
    for (int k = 0; k < kRowsPerStep; ++k) {
      const int q = q0 + k;
      const bool row_ok = q >= 0 && q < h && q <= row_end;
      const int load_cols = row_ok ? cols : 0;
      strips.load(k, load_cols > 0 ? xp + (q * w + col0) : xp, load_cols);
    }
#pragma unroll
    for (int k = 0; k < kRowsPerStep; ++k) {
      const int q = q0 + k;
      const bool row_ok = active && q >= 0 && q < h && q <= row_end;
      float low[S + 2];  // row q = o + 1
      strips.to_float(k, low + 1);
      float left = __shfl_up_sync(kFullMask, low[S], 1, g);
      float right = __shfl_down_sync(kFullMask, low[1], 1, g);
      if (sub == 0) {  // outer left neighbour: zero padding, or the previous chunk's last column
        left = (row_ok && col0 > 0) ? Elem<T>::to_float(xp[q * w + col0 - 1]) : 0.0f;
      }
      if (sub == g - 1) {  // outer right neighbour: zero padding, or the next chunk's first column
        right = (row_ok && col0 + S < w) ? Elem<T>::to_float(xp[q * w + col0 + S]) : 0.0f;
      }
      low[0] = left;
      low[S + 1] = right;

      const int o = q - 1;
      if (cols > 0 && o >= row_begin && o < row_end) {
        float out[S];
#pragma unroll
        for (int j = 0; j < S; ++j) {
          float acc = b;
          acc = fmaf(wk[0], up[j], acc);
          acc = fmaf(wk[1], up[j + 1], acc);
          acc = fmaf(wk[2], up[j + 2], acc);
          acc = fmaf(wk[3], mid[j], acc);
          acc = fmaf(wk[4], mid[j + 1], acc);
          acc = fmaf(wk[5], mid[j + 2], acc);
          acc = fmaf(wk[6], low[j], acc);
          acc = fmaf(wk[7], low[j + 1], acc);
          acc = fmaf(wk[8], low[j + 2], acc);
          out[j] = relu(acc);
        }
        store_strip<T, kVec>(yp + (o * w + col0), out, cols);
        if (kSums) {
          // Sum what was stored (FP16-rounded for FP16), so sums == y.sum((2, 3)) up to FP32 order.
#pragma unroll
          for (int j = 0; j < S; ++j) {
            if (j < cols) lane_sum += Elem<T>::to_float(Elem<T>::from_float(out[j]));
          }
        }
      }
#pragma unroll
      for (int j = 0; j < S + 2; ++j) {
        up[j] = mid[j];
        mid[j] = low[j];
      }
    }
  }

  if (kSums) {
    // Butterfly inside the walker's G lanes: every lane ends with the same bits (a+b == b+a).
    for (int offset = g >> 1; offset > 0; offset >>= 1) lane_sum += __shfl_xor_sync(kFullMask, lane_sum, offset);
    if (sub == 0 && plane_local < planes_per_cta) walker_sums[walker] = lane_sum;
    __syncthreads();
    const int t = static_cast<int>(threadIdx.x);
    if (t < planes_per_cta) {
      const long long p = static_cast<long long>(blockIdx.x) * planes_per_cta + t;
      if (p < planes) {
        float total = 0.0f;
        for (int u = 0; u < units; ++u) total += walker_sums[t * units + u];  // fixed order
        sums[p] = total;
      }
    }
  }
}

template <typename T, bool kSums>
__device__ __forceinline__ void depthwise_launch(const T* __restrict__ x, const float* __restrict__ weight,
                                                 const float* __restrict__ bias, int n, int c, int h, int w,
                                                 int lanes_per_row, int bands_per_plane, int planes_per_cta,
                                                 T* __restrict__ y, float* __restrict__ sums) {
  constexpr int S = Elem<T>::kStrip;
  __shared__ float walker_sums[kSums ? kMaxThreads : 1];
  const int g = lanes_per_row;
  const bool shape_ok = n >= 1 && c >= 1 && h >= 1 && w >= 1 && static_cast<long long>(h) * w <= 2147483647ll &&
                        bands_per_plane >= 1 && planes_per_cta >= 1;
  const bool lanes_ok = g >= 1 && g <= 32 && (g & (g - 1)) == 0;
  const bool block_ok = blockDim.x % 32 == 0 && blockDim.x <= kMaxThreads && blockDim.y == 1 && blockDim.z == 1;
  bool ok = shape_ok && lanes_ok && block_ok;
  if (ok) {
    const long long walkers_per_cta = static_cast<long long>(blockDim.x / 32) * (32 / g);
    const long long units = static_cast<long long>(chunks_per_row(w, g, S)) * bands_per_plane;
    const long long planes = static_cast<long long>(n) * c;
    const long long grid = (planes + planes_per_cta - 1) / planes_per_cta;
    ok = static_cast<long long>(planes_per_cta) * units <= walkers_per_cta && gridDim.x == grid &&
         gridDim.y == 1 && gridDim.z == 1;
  }
  if (!ok) asm volatile("trap;");  // a launch the host arithmetic never produces: fail loudly

  const u64 addresses = reinterpret_cast<u64>(x) | reinterpret_cast<u64>(y);
  const bool vec = (w % S) == 0 && (addresses & (Elem<T>::kAlign - 1ull)) == 0;
  if (vec) {
    depthwise_walk<T, kSums, true>(x, weight, bias, n, c, h, w, g, bands_per_plane, planes_per_cta, y, sums,
                                   walker_sums);
  } else {
    depthwise_walk<T, kSums, false>(x, weight, bias, n, c, h, w, g, bands_per_plane, planes_per_cta, y, sums,
                                    walker_sums);
  }
}

}  // namespace osnet_dw

extern "C" __global__ void __launch_bounds__(256, 3)
    depthwise_liteconv_f32(const float* __restrict__ x, const float* __restrict__ weight,
                           const float* __restrict__ bias, int n, int c, int h, int w, int lanes_per_row,
                           int bands_per_plane, int planes_per_cta, float* __restrict__ y) {
  osnet_dw::depthwise_launch<float, false>(x, weight, bias, n, c, h, w, lanes_per_row, bands_per_plane,
                                           planes_per_cta, y, nullptr);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    depthwise_liteconv_f16(const unsigned short* __restrict__ x, const float* __restrict__ weight,
                           const float* __restrict__ bias, int n, int c, int h, int w, int lanes_per_row,
                           int bands_per_plane, int planes_per_cta, unsigned short* __restrict__ y) {
  osnet_dw::depthwise_launch<unsigned short, false>(x, weight, bias, n, c, h, w, lanes_per_row, bands_per_plane,
                                                    planes_per_cta, y, nullptr);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    depthwise_liteconv_sums_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                const float* __restrict__ bias, int n, int c, int h, int w, int lanes_per_row,
                                int bands_per_plane, int planes_per_cta, float* __restrict__ y,
                                float* __restrict__ sums) {
  osnet_dw::depthwise_launch<float, true>(x, weight, bias, n, c, h, w, lanes_per_row, bands_per_plane,
                                          planes_per_cta, y, sums);
}

extern "C" __global__ void __launch_bounds__(256, 3)
    depthwise_liteconv_sums_f16(const unsigned short* __restrict__ x, const float* __restrict__ weight,
                                const float* __restrict__ bias, int n, int c, int h, int w, int lanes_per_row,
                                int bands_per_plane, int planes_per_cta, unsigned short* __restrict__ y,
                                float* __restrict__ sums) {
  osnet_dw::depthwise_launch<unsigned short, true>(x, weight, bias, n, c, h, w, lanes_per_row, bands_per_plane,
                                                   planes_per_cta, y, sums);
}
