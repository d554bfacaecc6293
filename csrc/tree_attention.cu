// Tree attention in plain CUDA: same semantics as saguaro/kernels/reference.py.
//
// One thread block per (batch * query head, tree query). Each warp walks every
// kWarpsPerBlock-th key with its own online softmax while its lanes split the head
// dimension, so every key and value row is read by one warp in coalesced loads. The
// warps' partial softmax states are merged through shared memory at the end.
// Accumulation is fp32 for every element type.
#include "tree_attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace saguaro {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kBitsPerWord = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_all_reduce_sum(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(kFullWarp, x, offset);
  }
  return x;
}

__device__ __forceinline__ bool tree_key_visible(const int32_t* mask_row, int tree_key) {
  // Arithmetic shift of a negative word still leaves the wanted bit at position 0.
  return (mask_row[tree_key / kBitsPerWord] >> (tree_key % kBitsPerWord)) & 1;
}

// kDimsPerLane: head dimensions held by each lane (head_dim <= 32 * kDimsPerLane).
template <typename scalar_t, int kDimsPerLane>
__global__ void __launch_bounds__(kWarpSize * kWarpsPerBlock)
    tree_attention_kernel(const TreeAttentionParams p) {
  const int batch = blockIdx.x / p.q_heads;
  const int head = blockIdx.x % p.q_heads;
  const int kv_head = head / (p.q_heads / p.kv_heads);
  const int query = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + batch * p.q_strides[0] + head * p.q_strides[1] +
                      query * p.q_strides[2];
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + batch * p.k_strides[0] + kv_head * p.k_strides[1];
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + batch * p.v_strides[0] + kv_head * p.v_strides[1];
  const int32_t* mask_row = p.tree_mask + batch * p.mask_strides[0] + query * p.mask_strides[1];

  float q_part[kDimsPerLane];
  float acc[kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kDimsPerLane; ++r) {
    const int d = lane + r * kWarpSize;
    q_part[r] = d < p.head_dim ? to_float(q[d]) : 0.f;
    acc[r] = 0.f;
  }

  float running_max = -INFINITY;
  float running_sum = 0.f;
  const int kv_len = p.prefix_len + p.tree_len;
  const int first_key = p.kv_start != nullptr ? p.kv_start[batch] : 0;
  for (int key = first_key + warp; key < kv_len; key += kWarpsPerBlock) {
    // The prefix is visible to every tree query; tree keys follow the mask. The test is
    // the same for all lanes, so the warp stays converged for the shuffles below.
    if (key >= p.prefix_len && !tree_key_visible(mask_row, key - p.prefix_len)) continue;

    const scalar_t* k_row = k + key * p.k_strides[2];
    float partial = 0.f;
#pragma unroll
    for (int r = 0; r < kDimsPerLane; ++r) {
      const int d = lane + r * kWarpSize;
      if (d < p.head_dim) partial += q_part[r] * to_float(k_row[d]);
    }
    const float score = warp_all_reduce_sum(partial) * p.scale;
    const float new_max = fmaxf(running_max, score);
    const float correction = expf(running_max - new_max);  // 0 before the first visible key
    const float weight = expf(score - new_max);
    running_sum = running_sum * correction + weight;
    const scalar_t* v_row = v + key * p.v_strides[2];
#pragma unroll
    for (int r = 0; r < kDimsPerLane; ++r) {
      const int d = lane + r * kWarpSize;
      if (d < p.head_dim) acc[r] = acc[r] * correction + weight * to_float(v_row[d]);
    }
    running_max = new_max;
  }

  __shared__ float warp_max[kWarpsPerBlock];
  __shared__ float warp_sum[kWarpsPerBlock];
  __shared__ float warp_acc[kWarpsPerBlock][kWarpSize * kDimsPerLane];
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int r = 0; r < kDimsPerLane; ++r) warp_acc[warp][lane + r * kWarpSize] = acc[r];
  __syncthreads();

  // A warp that saw no visible key holds max -inf and gets weight exp(-inf) = 0; some warp
  // always sees the query's own key, so the block max is finite.
  float block_max = -INFINITY;
  for (int w = 0; w < kWarpsPerBlock; ++w) block_max = fmaxf(block_max, warp_max[w]);
  float warp_weight[kWarpsPerBlock];
  float total = 0.f;
  for (int w = 0; w < kWarpsPerBlock; ++w) {
    warp_weight[w] = expf(warp_max[w] - block_max);
    total += warp_sum[w] * warp_weight[w];
  }
  scalar_t* out = static_cast<scalar_t*>(p.out) + batch * p.out_strides[0] + head * p.out_strides[1] +
                  query * p.out_strides[2];
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float value = 0.f;
    for (int w = 0; w < kWarpsPerBlock; ++w) value += warp_acc[w][d] * warp_weight[w];
    out[d] = from_float<scalar_t>(value / total);
  }
}

template <typename scalar_t>
cudaError_t launch_for_element_type(const TreeAttentionParams& p, cudaStream_t stream) {
  // Batch * heads on x (up to 2^31 - 1 blocks); tree queries on y (up to 65535).
  const dim3 grid(p.batch * p.q_heads, p.tree_len);
  const dim3 block(kWarpSize * kWarpsPerBlock);
  const int dims_per_lane = (p.head_dim + kWarpSize - 1) / kWarpSize;
  if (dims_per_lane <= 1) {
    tree_attention_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(p);
  } else if (dims_per_lane <= 2) {
    tree_attention_kernel<scalar_t, 2><<<grid, block, 0, stream>>>(p);
  } else if (dims_per_lane <= 4) {
    tree_attention_kernel<scalar_t, 4><<<grid, block, 0, stream>>>(p);
  } else if (dims_per_lane <= kMaxHeadDim / kWarpSize) {
    tree_attention_kernel<scalar_t, kMaxHeadDim / kWarpSize><<<grid, block, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tree_attention(const TreeAttentionParams& params, ElementType type, cudaStream_t stream) {
  switch (type) {
    case ElementType::kFloat32:
      return launch_for_element_type<float>(params, stream);
    case ElementType::kFloat16:
      return launch_for_element_type<__half>(params, stream);
    case ElementType::kBFloat16:
      return launch_for_element_type<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace saguaro
