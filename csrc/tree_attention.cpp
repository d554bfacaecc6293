// PyTorch binding of the CUDA tree attention kernel (module saguaro._C).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "tree_attention.h"

namespace {

saguaro::ElementType element_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return saguaro::ElementType::kFloat32;
    case at::kHalf:
      return saguaro::ElementType::kFloat16;
    case at::kBFloat16:
      return saguaro::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, "tree attention supports float32, float16 and bfloat16, got ", type);
  }
}

// The kernel walks rows with strides but reads each row as one contiguous span; copying
// only when that fails keeps views of a larger cache buffer copy-free.
torch::Tensor with_contiguous_last_dim(const torch::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void store_outer_strides(const torch::Tensor& t, int64_t* strides) {
  for (int dim = 0; dim < 3; ++dim) strides[dim] = t.stride(dim);
}

}  // namespace

torch::Tensor tree_attention_cuda(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor tree_mask,
                                  double scale, std::optional<torch::Tensor> kv_start) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda() && tree_mask.is_cuda(), "tensors must be on a CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, tokens, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  const int64_t batch = q.size(0), q_heads = q.size(1), tree_len = q.size(2), head_dim = q.size(3);
  const int64_t kv_heads = k.size(1), prefix_len = k.size(2) - tree_len, words = (tree_len + 31) / 32;
  TORCH_CHECK(k.size(0) == batch && v.sizes() == k.sizes(), "k and v must be [B, Hkv, L + T, D] with q's batch");
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(prefix_len >= 0, "k must hold at least the T tree tokens");
  TORCH_CHECK(tree_len <= 65535, "the kernel launches one block row per tree query, at most 65535");
  TORCH_CHECK(k.size(3) == head_dim && head_dim <= saguaro::kMaxHeadDim, "head_dim must match and be <= ",
              saguaro::kMaxHeadDim);
  TORCH_CHECK(tree_mask.scalar_type() == at::kInt && tree_mask.dim() == 4 && tree_mask.size(1) == 1 &&
                  tree_mask.size(2) == tree_len && tree_mask.size(3) == words,
              "tree_mask must be int32 [B, 1, T, ceil(T / 32)]");

  const c10::cuda::CUDAGuard device_guard(q.device());
  q = with_contiguous_last_dim(q);
  k = with_contiguous_last_dim(k);
  v = with_contiguous_last_dim(v);
  // expand gives a tree shared by the batch a zero batch stride instead of a copy.
  const torch::Tensor mask = with_contiguous_last_dim(tree_mask.expand({batch, 1, tree_len, words}));
  torch::Tensor starts;
  if (kv_start.has_value()) {
    starts = kv_start->to(q.device(), at::kInt).contiguous();
    TORCH_CHECK(starts.numel() == batch, "kv_start must hold one entry per batch row");
  }
  torch::Tensor out = torch::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;

  saguaro::TreeAttentionParams params{};
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.tree_mask = mask.data_ptr<int32_t>();
  params.kv_start = starts.defined() ? starts.data_ptr<int32_t>() : nullptr;
  store_outer_strides(q, params.q_strides);
  store_outer_strides(k, params.k_strides);
  store_outer_strides(v, params.v_strides);
  store_outer_strides(out, params.out_strides);
  params.mask_strides[0] = mask.stride(0);
  params.mask_strides[1] = mask.stride(2);
  params.batch = static_cast<int>(batch);
  params.q_heads = static_cast<int>(q_heads);
  params.kv_heads = static_cast<int>(kv_heads);
  params.tree_len = static_cast<int>(tree_len);
  params.prefix_len = static_cast<int>(prefix_len);
  params.head_dim = static_cast<int>(head_dim);
  params.scale = static_cast<float>(scale);

  const cudaError_t status =
      saguaro::launch_tree_attention(params, element_type(q.scalar_type()), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "tree attention launch failed: ", cudaGetErrorString(status));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tree_attention_cuda", &tree_attention_cuda,
        "Tree attention: q [B, Hq, T, D], k/v [B, Hkv, L + T, D], int32 tree_mask [B, 1, T, ceil(T / 32)], "
        "optional int32 kv_start [B]; returns [B, Hq, T, D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("tree_mask"), py::arg("scale"),
        py::arg("kv_start") = py::none());
}
