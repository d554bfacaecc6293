"""Every engine on a CUDA device: greedy equal to HF greedy there, sampling with a generator on
either device, and the Saguaro worker's placements. Skipped without a GPU; run by
benchmarks/gpu_check.sh on a lent machine."""

import pytest
import torch
from conftest import perturbed_copy, tiny_model

import saguaro
from saguaro.kernels import TreeBackendUnavailable, choose_tree_backend
from saguaro.kernels.hf_attention import TREE_ATTENTION_NAMES

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(300),
]
PROMPT = [1, 17, 33, 5, 80, 42, 9, 64, 23]


def hf_greedy(target, ids):
    return target.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)


def cuda_pair(attention: str | None = None):
    target = tiny_model("llama", seed=0).to("cuda")
    draft = perturbed_copy(target, 0.005)
    if attention is not None:  # trees go through this backend; HF's own steps (no tree) through SDPA
        try:  # a machine without nvcc skips the CUDA backend; a failing build fails
            choose_tree_backend(TREE_ATTENTION_NAMES[attention], target.device)
        except TreeBackendUnavailable as error:
            pytest.skip(str(error))
        target.set_attn_implementation(attention)
    return target, draft


@pytest.mark.parametrize(
    "method, options",
    [
        ("autoregressive", {}),
        ("prompt_lookup", {}),
        ("speculative", {}),
        ("tree", {}),
        ("saguaro", {"placement": "thread"}),
        ("saguaro", {"placement": "process"}),
        ("saguaro", {"placement": "inline"}),
        ("auto", {}),
        # compile=True: CUDA graphs over static caches (test_compile.py checks the CPU build).
        ("autoregressive", {"compile": True}),
        ("speculative", {"compile": True}),
        ("tree", {"compile": True}),
        # The tree verified through each tree-attention backend (csrc/'s built just in time).
        *[("tree", {"attention": f"saguaro_tree{backend}"}) for backend in ("", "_cuda", "_sdpa")],
    ],
)
def test_greedy_on_cuda_equals_hf_greedy(method, options):
    options = dict(options)
    target, draft = cuda_pair(options.pop("attention", None))
    ids = torch.tensor([PROMPT], device="cuda")
    expected = hf_greedy(target, ids)
    out = saguaro.generate(
        target,
        ids,
        draft_model=draft,
        method=method,
        max_new_tokens=40,
        eos_token_id=[],
        speculation_schedule="constant",
        return_dict_in_generate=True,
        **options,
    )
    assert out.sequences.device.type == "cuda"
    assert out.sequences.tolist() == expected.tolist()
    if method in ("speculative", "tree", "saguaro"):
        assert out.stats.accepted > 0 and out.stats.worker_failures == 0


@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
@pytest.mark.parametrize("method", ["speculative", "tree", "saguaro"])
def test_sampling_on_cuda_with_a_generator_on_either_device(method, generator_device):
    target, draft = cuda_pair()
    ids = torch.tensor([PROMPT], device="cuda")

    def sample():
        generator = torch.Generator(generator_device).manual_seed(3)
        return saguaro.generate(
            target,
            ids,
            draft_model=draft,
            method=method,
            max_new_tokens=24,
            do_sample=True,
            eos_token_id=[],
            speculation_schedule="constant",
            generator=generator,
            placement="inline" if method == "saguaro" else None,
        ).tolist()

    first = sample()
    assert len(first[0]) == len(PROMPT) + 24
    assert sample() == first  # seeded: the same sample (fixed method, constant schedule, inline)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_drafter_on_its_own_gpu():
    target = tiny_model("llama", seed=0).to("cuda:0")
    draft = perturbed_copy(target, 0.005).to("cuda:1")
    ids = torch.tensor([PROMPT], device="cuda:0")
    expected = hf_greedy(target, ids)
    out = saguaro.generate(
        target,
        ids,
        draft_model=draft,
        method="saguaro",
        draft_device="cuda:1",
        max_new_tokens=40,
        eos_token_id=[],
    )
    assert out.tolist() == expected.tolist()
