// Tree attention launcher shared by the CUDA kernel and its PyTorch binding.
//
// Kept free of torch headers so tree_attention.cu compiles with plain nvcc.
// Layout (as in saguaro/kernels/reference.py):
//   q    [B, Hq, T, D]       one query per draft-tree token
//   k, v [B, Hkv, L + T, D]  committed prefix followed by the tree tokens
//   tree_mask int32 [B, T, W] bit j % 32 of word j / 32 in row i: query i sees tree key j
//   kv_start  int32 [B]      keys before kv_start[b] are left padding (nullptr: none)
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace saguaro {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

struct TreeAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;  // [B, Hq, T, D], same element type as q
  const int32_t* tree_mask;
  const int32_t* kv_start;
  // Element strides of the batch, head and token dimensions; the head dimension is contiguous.
  int64_t q_strides[3];
  int64_t k_strides[3];
  int64_t v_strides[3];
  int64_t out_strides[3];
  int64_t mask_strides[2];  // batch, row
  int batch;
  int q_heads;
  int kv_heads;
  int tree_len;
  int prefix_len;
  int head_dim;  // at most kMaxHeadDim
  float scale;
};

constexpr int kMaxHeadDim = 256;

// Enqueues the kernel on `stream`; returns the launch status.
cudaError_t launch_tree_attention(const TreeAttentionParams& params, ElementType type, cudaStream_t stream);

}  // namespace saguaro
