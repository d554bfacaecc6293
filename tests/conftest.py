"""Tiny random-weight models built from configs: fast, exact, no model hub."""

import gc
import multiprocessing
import time

import pytest
import torch
import transformers

SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
ARCHITECTURES = ["llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox", "phi3"]


def _config(arch: str, vocab: int, layers: int, hidden: int, init: float):
    heads, kv_heads = 4, 2
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=512,
            initializer_range=init,
            **SPECIAL_TOKENS,
        )
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=2 * hidden,
            max_position_embeddings=512,
            initializer_range=init,
            **SPECIAL_TOKENS,
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
    }
    extra = {"head_dim": hidden // heads} if arch == "gemma" else {}
    if arch == "mistral":
        extra["sliding_window"] = 24  # short enough that the tests cross it
    return classes[arch](
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=init,
        **SPECIAL_TOKENS,
        **extra,
    )


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    vocab: int = 96,
    layers: int = 2,
    hidden: int = 32,
    init: float = 0.2,
    dtype=torch.float32,
):
    """A random model; same (arch, seed, sizes) -> same weights."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, vocab, layers, hidden, init))
    return model.to(dtype).eval()


def perturbed_copy(model, noise: float, seed: int = 123):
    """A draft that agrees with `model` often but not always."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    return draft


WORDS = [f"w{i}" for i in range(91)]


def word_tokenizer():
    """A tokenizer for the tiny models' 96 ids: specials 0-3, words "w0".."w90" (ids 4-94) and
    "abcdef" (95), the prefix HF's StopStringCriteria tokenizes to learn how tokens decode."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        "[PAD]": 0,
        "<s>": 1,
        "</s>": 2,
        "[UNK]": 3,
        **{w: i + 4 for i, w in enumerate(WORDS)},
        "abcdef": 95,
    }
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        model_input_names=["input_ids", "attention_mask"],
    )


@pytest.fixture(autouse=True)
def _one_thread():
    # Deterministic and fair on a 2-core machine; tests never assert timings.
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    # Each test measures afresh: a verdict stored by an earlier test (or by the developer's own
    # runs in ~/.cache/saguaro) must not decide what this one checks. test_disk_cache turns it on.
    monkeypatch.setenv("SAGUARO_CACHE_DIR", "off")


@pytest.fixture(autouse=True)
def _collect_dropped_generators():
    # A generator dropped without close() stops its worker when Python collects it, and one in a
    # reference cycle waits for a garbage-collection pass: collect after each test, so that a test
    # counting live worker processes never sees an earlier test's (seen once in CI: every such
    # test after test_distributed's seventh failed on one leftover worker).
    yield
    if multiprocessing.active_children():  # a full collection costs ~0.4 s: only when it can matter
        gc.collect()


def slow_verification(monkeypatch, seconds: float = 0.03):
    """Make each verification last `seconds`, as a large target's does: pre-speculation, which the
    outcome interrupts, then has the time to reach full depth (tiny models verify in ~1 ms)."""
    from saguaro.decode import engines

    real_verify = engines.verify_proposal

    def verify(*args):
        time.sleep(seconds)
        return real_verify(*args)

    monkeypatch.setattr(engines, "verify_proposal", verify)


def pytest_addoption(parser):
    parser.addoption(
        "--compile",
        action="store_true",
        help="build every SpeculativeGenerator with compile=True (models with sliding windows excepted)",
    )


@pytest.fixture(autouse=True)
def _compile_everything(request, monkeypatch):
    """`pytest --compile`: the whole suite through compiled steps, so every exactness test also
    checks the compiled path (slow: graphs compile for each model shape)."""
    if request.config.getoption("--compile"):
        from saguaro.api import SpeculativeGenerator

        real_init = SpeculativeGenerator.__init__

        def init(self, target, draft_model=None, *args, **kwargs):
            models = (target, draft_model)
            windowed = any(getattr(getattr(m, "config", None), "sliding_window", None) for m in models)
            kwargs.setdefault("compile", not windowed)
            real_init(self, target, draft_model, *args, **kwargs)

        monkeypatch.setattr(SpeculativeGenerator, "__init__", init)
    yield
