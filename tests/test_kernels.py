"""Tree attention: mask packing, the reference, the Triton kernel and the transformers backend.

Without a GPU the Triton kernel is checked under Triton's CPU interpreter (see below).
"""

import copy
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saguaro import kernels
from saguaro.kernels import hf_attention
from saguaro.kernels.reference import pack_tree_mask, tree_attention_reference, unpack_tree_mask

MAX_ABS_ERROR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_parents(num_nodes: int, generator: torch.Generator) -> list[int]:
    """A random draft forest: node i hangs under an earlier node, or is a root (-1)."""
    return [int(torch.randint(-1, node, (1,), generator=generator)) for node in range(num_nodes)]


def chain_parents(num_nodes: int) -> list[int]:
    """A single chain, whose ancestor mask is the causal mask."""
    return list(range(-1, num_nodes - 1))


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """Dense [T, T] bool mask: row i sees itself and all its ancestors."""
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[node] = mask[parent]
        mask[node, node] = True
    return mask


def depths(parents: list[int]) -> list[int]:
    """Distance of each node from its root, which offsets its position id past the prompt."""
    depth = []
    for parent in parents:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    return depth


def drop_one_ancestor(dense: torch.Tensor) -> torch.Tensor:
    """The same masks with one ancestor bit cleared: what a subtly wrong mask looks like.

    The bit comes from the row seeing the fewest tree keys, where it weighs the most.
    """
    tree_len = dense.shape[-1]
    ancestors = dense & ~torch.eye(tree_len, dtype=torch.bool, device=dense.device)
    visible = dense.sum(-1).masked_fill(~ancestors.any(-1), tree_len + 1)
    batch, row = divmod(int(visible.argmin()), tree_len)
    broken = dense.clone()
    broken[batch, row, ancestors[batch, row].nonzero()[0]] = False
    return broken


@dataclass(frozen=True)
class Case:
    batch: int
    q_heads: int
    kv_heads: int
    tree_len: int
    prefix_len: int
    head_dim: int
    dtype: torch.dtype
    chain: bool = False
    kv_start: tuple[int, ...] | None = None

    def __str__(self) -> str:
        heads = f"H{self.q_heads}/{self.kv_heads}"
        shape = f"B{self.batch}-{heads}-T{self.tree_len}-L{self.prefix_len}-D{self.head_dim}"
        extras = ("-chain" if self.chain else "-tree") + (
            f"-start{list(self.kv_start)}" if self.kv_start else ""
        )
        return f"{shape}-{str(self.dtype).removeprefix('torch.')}{extras}"


def make_inputs(case: Case, seed: int = 0, device: str = "cpu"):
    """Random q, k, v, per-row tree masks (dense [B, T, T]) and kv_start for a case."""
    generator = torch.Generator().manual_seed(seed)
    kv_len = case.prefix_len + case.tree_len
    q = torch.randn(case.batch, case.q_heads, case.tree_len, case.head_dim, generator=generator)
    k = torch.randn(case.batch, case.kv_heads, kv_len, case.head_dim, generator=generator)
    # Values in [-1, 1] keep outputs below 1, where one fp16 / bf16 ulp fits the bounds.
    v = torch.rand(case.batch, case.kv_heads, kv_len, case.head_dim, generator=generator) * 2 - 1
    trees = [
        chain_parents(case.tree_len) if case.chain else random_parents(case.tree_len, generator)
        for _ in range(case.batch)
    ]
    dense = torch.stack([ancestor_mask(parents) for parents in trees])
    kv_start = (
        None if case.kv_start is None else torch.tensor(case.kv_start, dtype=torch.int32, device=device)
    )
    # q is scaled up so that softmax rows are peaked, where a wrong running max shows.
    tensors = [(2 * q).to(device, case.dtype), k.to(device, case.dtype), v.to(device, case.dtype)]
    return *tensors, dense.to(device), kv_start


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= MAX_ABS_ERROR[dtype], f"max abs error {error} > {MAX_ABS_ERROR[dtype]}"


# ---- mask packing ----


def test_pack_tree_mask_bit_layout():
    dense = torch.zeros(40, 40, dtype=torch.bool)
    dense[0, [0, 31, 33]] = True
    dense[1, 32] = True
    packed = pack_tree_mask(dense)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1, 40, 2)
    # Row 0: bits 0 and 31 of word 0 (0x80000001 as a signed int32), bit 1 of word 1.
    assert packed[0, 0, 0].tolist() == [1 - 2**31, 2]
    assert packed[0, 0, 1].tolist() == [0, 1]


@pytest.mark.parametrize("tree_len", [1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(tree_len):
    dense = torch.rand(3, tree_len, tree_len, generator=torch.Generator().manual_seed(tree_len)) < 0.5
    assert torch.equal(unpack_tree_mask(pack_tree_mask(dense), tree_len), dense)
    assert torch.equal(unpack_tree_mask(pack_tree_mask(dense[0]), tree_len), dense[:1])


# ---- reference ----

REFERENCE_CASES = [
    Case(2, 4, 2, 5, 7, 16, torch.float32, kv_start=(0, 3)),
    Case(1, 4, 1, 33, 0, 32, torch.float32, chain=True),
    Case(2, 2, 2, 64, 300, 16, torch.float32, kv_start=(300, 11)),
]


def dense_sdpa(q, k, v, dense, scale, kv_start):
    """Tree attention spelled out with torch's SDPA and a mask built straight from the trees."""
    batch, _, tree_len, _ = q.shape
    prefix_len = k.shape[2] - tree_len
    starts = torch.zeros(batch, dtype=torch.int32) if kv_start is None else kv_start
    prefix = torch.arange(prefix_len)[None, None, :] >= starts[:, None, None]
    allowed = torch.cat([prefix.expand(batch, tree_len, prefix_len), dense], dim=-1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=True)


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_reference_matches_dense_sdpa(case):
    q, k, v, dense, kv_start = make_inputs(case)
    scale = case.head_dim**-0.5
    expected = dense_sdpa(q, k, v, dense, scale, kv_start)
    assert_close(
        tree_attention_reference(q, k, v, pack_tree_mask(dense), scale, kv_start), expected, case.dtype
    )


def test_reference_differs_when_an_ancestor_is_dropped():
    q, k, v, dense, _ = make_inputs(REFERENCE_CASES[1])
    scale = q.shape[-1] ** -0.5
    broken = tree_attention_reference(q, k, v, pack_tree_mask(drop_one_ancestor(dense)), scale)
    error = (broken - dense_sdpa(q, k, v, dense, scale, None)).abs().max().item()
    assert error > 100 * MAX_ABS_ERROR[torch.float32]


# ---- Triton kernel, interpreted on CPU ----

# Triton decides between compiling and interpreting when a @triton.jit function is
# decorated, its own tl.zeros & co. included, i.e. when triton is imported. So interpreted
# tests need a process started with TRITON_INTERPRET=1: a normal run skips them and
# test_triton_kernel_in_interpreter_subprocess reruns them (selected by "interpreted")
# in such a process.
INTERPRETED_SESSION = kernels.uses_triton(torch.empty(0))
interpreted_only = pytest.mark.skipif(
    not INTERPRETED_SESSION,
    reason="run by test_triton_kernel_in_interpreter_subprocess under TRITON_INTERPRET=1",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED_SESSION, reason="this session already interprets Triton")
def test_triton_kernel_in_interpreter_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "interpreted", "-p", "no:cacheprovider"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0 and "skipped" not in summary, result.stdout[-8000:] + result.stderr[-4000:]


TRITON_CASES = [
    Case(1, 4, 2, 1, 0, 16, torch.float32),
    Case(2, 4, 2, 5, 7, 32, torch.float16, kv_start=(0, 3)),
    # Row 1 is all padding (kv_start == L), L is no multiple of the key block.
    Case(2, 4, 1, 33, 300, 16, torch.bfloat16, kv_start=(5, 300)),
    Case(1, 4, 4, 64, 0, 32, torch.float32, chain=True),
    Case(1, 2, 1, 64, 2048, 16, torch.float16),
    Case(1, 2, 2, 5, 7, 80, torch.float32),
    Case(1, 4, 2, 33, 7, 64, torch.bfloat16, chain=True),
    Case(1, 1, 1, 300, 5, 16, torch.float16, chain=True),
    # A 2k-token prefill through the tree path: many query blocks, diagonal skipping.
    Case(1, 1, 1, 2048, 0, 16, torch.float16, chain=True),
    Case(2, 4, 1, 64, 300, 16, torch.float32, kv_start=(0, 7)),
    Case(1, 2, 1, 5, 33, 128, torch.float16),
    Case(1, 1, 1, 33, 0, 96, torch.bfloat16),
    # fp32 with head_dim 256 takes the narrow 32 x 32 tiles.
    Case(1, 1, 1, 40, 7, 256, torch.float32, chain=True),
]


@interpreted_only
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_interpreted_triton_matches_reference(case):
    q, k, v, dense, kv_start = make_inputs(case)
    packed = pack_tree_mask(dense)
    scale = case.head_dim**-0.5
    actual = kernels.tree_attention(q, k, v, packed, scale, kv_start)
    assert actual.dtype == case.dtype and actual.shape == q.shape
    assert_close(actual, tree_attention_reference(q, k, v, packed, scale, kv_start), case.dtype)


@interpreted_only
def test_interpreted_triton_differs_when_an_ancestor_is_dropped():
    case = Case(1, 2, 1, 33, 7, 16, torch.float32)
    q, k, v, dense, _ = make_inputs(case)
    scale = case.head_dim**-0.5
    actual = kernels.tree_attention(q, k, v, pack_tree_mask(dense), scale)
    wrong = tree_attention_reference(q, k, v, pack_tree_mask(drop_one_ancestor(dense)), scale)
    assert (actual - wrong).abs().max().item() > 100 * MAX_ABS_ERROR[torch.float32]


@interpreted_only
def test_interpreted_triton_shares_one_tree_across_the_batch():
    case = Case(3, 2, 1, 9, 4, 16, torch.float32)
    q, k, v, dense, _ = make_inputs(case)
    shared = pack_tree_mask(dense[0])
    scale = case.head_dim**-0.5
    expected = tree_attention_reference(q, k, v, shared.expand(3, -1, -1, -1), scale)
    assert_close(kernels.tree_attention(q, k, v, shared, scale), expected, case.dtype)


# Largest shared memory one thread block may opt into, by compute capability.
MAX_SHARED_MEMORY = {80: 166912, 90: 232448}


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRETED_SESSION, reason="this session interprets Triton instead of compiling it")
@pytest.mark.parametrize(
    "dtype, head_dim, arch",
    [(torch.float32, 256, 80), (torch.bfloat16, 128, 90)],
    ids=["float32-D256-sm80", "bfloat16-D128-sm90"],
)
def test_triton_kernel_compiles_for_gpu(dtype, head_dim, arch):
    """Lowers the kernel to GPU code, which needs no GPU and which the interpreter never does.

    fp32 with head_dim 256 has the widest tiles, so it checks they fit in shared memory.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from saguaro.kernels import triton_tree_attention as module

    kernel = module._tree_attention_fwd
    config = module.launch_config(dtype, head_dim, tree_len=64)
    options = {name: config.pop(name) for name in list(config) if name not in kernel.arg_names}
    signature = {}
    for name in kernel.arg_names:
        if name in config:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = f"*{module.TRITON_DTYPES[dtype]}"
        elif name in ("TreeMask", "KvStart"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    constexprs = {(kernel.arg_names.index(name),): value for name, value in config.items()}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32), options=options
    )
    assert 0 < compiled.metadata.shared <= MAX_SHARED_MEMORY[arch]


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_triton_rejects_a_mask_of_the_wrong_width():
    from saguaro.kernels.triton_tree_attention import tree_attention_triton

    q, k, v, dense, _ = make_inputs(Case(1, 1, 1, 33, 0, 16, torch.float32))
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention_triton(q, k, v, pack_tree_mask(dense)[..., :1], 0.25)


# ---- transformers backend ----


def tiny_llama(attn_implementation: str, state_dict=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model.eval()


def test_register_hf_attention_is_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    assert hf_attention.register_hf_attention() == hf_attention.register_hf_attention() == "saguaro_tree"
    assert AttentionInterface()["saguaro_tree"] is hf_attention.saguaro_tree_attention_forward
    assert AttentionMaskInterface()["saguaro_tree"] is sdpa_mask
    assert hf_attention.register_hf_attention("cuda") == "saguaro_tree_cuda"
    assert AttentionInterface()["saguaro_tree_cuda"] is hf_attention.attention_forward("cuda")
    with pytest.raises(ValueError, match="one of"):
        hf_attention.register_hf_attention("flash")


# ---- backend choice ----


@pytest.mark.skipif(INTERPRETED_SESSION, reason="this session runs Triton on CPU")
def test_auto_backend_is_sdpa_on_cpu_and_explicit_choices_are_checked():
    cpu = torch.device("cpu")
    assert kernels.choose_tree_backend("auto", cpu) == "sdpa"
    assert kernels.choose_tree_backend("sdpa", cpu) == "sdpa"
    with pytest.raises(kernels.TreeBackendUnavailable, match="'sdpa'"):
        kernels.choose_tree_backend("triton", cpu)
    with pytest.raises(kernels.TreeBackendUnavailable, match="runs on CUDA devices.*'sdpa'"):
        kernels.choose_tree_backend("cuda", cpu)
    with pytest.raises(ValueError, match="one of"):
        kernels.choose_tree_backend("flash", cpu)


@pytest.mark.skipif(kernels.HAS_TRITON is False, reason="triton is not installed")
def test_auto_backend_is_triton_on_cuda():
    # Only the device's type is looked at: no GPU is needed to ask.
    assert kernels.choose_tree_backend("auto", torch.device("cuda")) == "triton"


@pytest.fixture
def fresh_extension_load():
    from saguaro.kernels import build

    build._load_once.cache_clear()
    yield build
    build._load_once.cache_clear()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks what a CPU build of torch says")
def test_cuda_backend_without_cuda_torch_says_what_to_do(fresh_extension_load):
    with pytest.raises(kernels.TreeBackendUnavailable, match="CUDA build of torch.*'triton' or 'sdpa'"):
        kernels.choose_tree_backend("cuda", torch.device("cuda"))


def test_cuda_backend_without_nvcc_says_what_to_do(fresh_extension_load, monkeypatch):
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    monkeypatch.setitem(sys.modules, "saguaro._C", None)  # as if setup.py built nothing
    with pytest.raises(fresh_extension_load.CudaExtensionUnavailable, match="nvcc.*CUDA_HOME"):
        fresh_extension_load.load_cuda_extension()
    # The failure is remembered: the attention of every layer asks, and must not retry a build.
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    with pytest.raises(fresh_extension_load.CudaExtensionUnavailable):
        fresh_extension_load.load_cuda_extension()


def test_cuda_extension_builds_from_the_checkout_sources(fresh_extension_load, monkeypatch):
    """Where CUDA torch and nvcc exist, torch.utils.cpp_extension.load gets csrc/'s two files."""
    import torch.utils.cpp_extension

    calls, built = [], types.SimpleNamespace(__file__="saguaro_tree_attention.so")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: calls.append(kwargs) or built)
    monkeypatch.setitem(sys.modules, "saguaro._C", None)
    assert fresh_extension_load.load_cuda_extension() is built
    assert fresh_extension_load.load_cuda_extension() is built and len(calls) == 1  # built once
    sources = [Path(source) for source in calls[0]["sources"]]
    assert [source.name for source in sources] == ["tree_attention.cpp", "tree_attention.cu"]
    assert all(source.is_file() for source in sources)


def test_runner_rejects_the_cuda_backend_on_cpu():
    from saguaro.model.runner import ModelRunner

    model = tiny_llama(hf_attention.register_hf_attention("cuda"))
    with pytest.raises(kernels.TreeBackendUnavailable, match="saguaro_tree_sdpa"):
        ModelRunner(model, 32)
    assert ModelRunner(tiny_llama(hf_attention.register_hf_attention("sdpa")), 32)._tree_kernel


def check_hf_tree_step_matches_sdpa(chain: bool, backend: str = "auto") -> None:
    """A left-padded prompt, then one tree step: logits equal sdpa's given the same mask densely."""
    from transformers import DynamicCache

    tree_model = tiny_llama(hf_attention.register_hf_attention(backend))
    sdpa_model = tiny_llama("sdpa", tree_model.state_dict())

    generator = torch.Generator().manual_seed(1)
    batch, prompt_len, tree_len = 2, 6, 9
    left_pad = torch.tensor([0, 2], dtype=torch.int32)
    prompt = torch.randint(0, 128, (batch, prompt_len), generator=generator)
    not_padding = torch.arange(prompt_len)[None, :] >= left_pad[:, None]
    prompt_positions = (torch.arange(prompt_len)[None, :] - left_pad[:, None]).clamp(min=0)
    tree_cache, sdpa_cache = DynamicCache(config=tree_model.config), DynamicCache(config=sdpa_model.config)
    with torch.no_grad():
        prefill = [
            model(
                input_ids=prompt,
                attention_mask=not_padding.long(),
                position_ids=prompt_positions,
                cache=cache,
            )
            for model, cache in ((tree_model, tree_cache), (sdpa_model, sdpa_cache))
        ]
    torch.testing.assert_close(prefill[0].logits, prefill[1].logits, atol=1e-5, rtol=0)

    trees = [chain_parents(tree_len) if chain else random_parents(tree_len, generator) for _ in range(batch)]
    dense = torch.stack([ancestor_mask(parents) for parents in trees])
    tree_tokens = torch.randint(0, 128, (batch, tree_len), generator=generator)
    tree_positions = (prompt_len - left_pad)[:, None] + torch.tensor([depths(parents) for parents in trees])
    allowed = torch.cat([not_padding[:, None, :].expand(batch, tree_len, prompt_len), dense], dim=-1)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        tree_logits = tree_model(
            input_ids=tree_tokens,
            attention_mask=pack_tree_mask(dense),
            position_ids=tree_positions,
            cache=tree_cache,
            saguaro_kv_start=left_pad,
        ).logits
        sdpa_logits = sdpa_model(
            input_ids=tree_tokens, attention_mask=additive, position_ids=tree_positions, cache=sdpa_cache
        ).logits
    torch.testing.assert_close(tree_logits, sdpa_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "tree"])
def test_hf_tree_step_matches_sdpa_with_the_sdpa_backend(chain):
    check_hf_tree_step_matches_sdpa(chain, "sdpa")


@interpreted_only
@pytest.mark.parametrize("chain", [True, False], ids=["chain", "tree"])
def test_interpreted_hf_tree_step_matches_sdpa(chain):
    check_hf_tree_step_matches_sdpa(chain)


# ---- Triton kernel on a GPU ----

GPU_CASES = [
    Case(1, 8, 2, 2048, 0, 128, torch.float16, chain=True),
    Case(1, 8, 2, 2048, 0, 64, torch.bfloat16, chain=True),
    Case(2, 32, 8, 64, 4096, 128, torch.bfloat16, kv_start=(0, 1000)),
    Case(4, 4, 4, 33, 777, 80, torch.float32, kv_start=(0, 1, 64, 777)),
    Case(2, 8, 1, 1, 1000, 96, torch.float16),
    Case(2, 4, 2, 300, 129, 16, torch.float32),
    Case(1, 4, 2, 300, 513, 256, torch.float32, chain=True),
    Case(1, 4, 2, 65, 513, 256, torch.bfloat16),
]


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_tree_attention_on_gpu_matches_reference(case):
    q, k, v, dense, kv_start = make_inputs(case, device="cuda")
    packed = pack_tree_mask(dense)
    scale = case.head_dim**-0.5
    assert kernels.uses_triton(q)
    assert_close(
        kernels.tree_attention(q, k, v, packed, scale, kv_start),
        tree_attention_reference(q, k, v, packed, scale, kv_start),
        case.dtype,
    )
