"""Every private transformers API saguaro relies on, in one place (tested with transformers 5.x, 5.24).

The drop-in `generate` (hf/drop_in.py) has HF turn a call into a GenerationConfig, logits
processors and stopping criteria, so its semantics are HF's by construction. HF exposes those
steps only as private methods of `GenerationMixin`; each is wrapped here with the contract saguaro
relies on, and tests/test_hf_internals.py checks every one of them, so an upgrade that removes or
changes one fails there, naming it, instead of somewhere inside a generation.
"""

from __future__ import annotations

import torch

TESTED_TRANSFORMERS = "5.x (tested with 5.24)"


def _private(model, name: str):
    """model.<name>, or an error that names the missing HF method and the versions saguaro supports."""
    method = getattr(model, name, None)
    if method is None:
        raise RuntimeError(
            f"transformers' {type(model).__name__}.{name} is gone: saguaro's drop-in generate needs it "
            f"(supported: transformers {TESTED_TRANSFORMERS}); install a supported transformers or call "
            "saguaro.generate directly"
        )
    return method


def prepare_generation_config(model, generation_config, kwargs: dict):
    """`_prepare_generation_config(generation_config, **kwargs)` -> (config, model_kwargs): the model's
    generation_config overridden by `generation_config` and by the generate kwargs it recognises;
    the kwargs it does not recognise (input_ids, attention_mask, other model inputs) come back as
    model_kwargs. The model's own generation_config is not modified."""
    return _private(model, "_prepare_generation_config")(generation_config, **kwargs)


def prepare_special_tokens(model, config, has_attention_mask: bool, input_ids: torch.Tensor) -> None:
    """`_prepare_special_tokens`: sets config._eos_token_tensor / _pad_token_tensor (read back by
    `special_tokens`), with HF's defaults (pad = first EOS when unset), in place."""
    _private(model, "_prepare_special_tokens")(
        config, has_attention_mask, device=input_ids.device, batch_size=input_ids.shape[0]
    )


def infer_attention_mask(model, input_ids: torch.Tensor, config, model_kwargs: dict) -> torch.Tensor:
    """`_prepare_attention_mask_for_generation`: the mask HF uses when none was given - zeros where
    input_ids equals the pad token (unless pad is also an EOS), ones elsewhere; needs
    `prepare_special_tokens` first."""
    return _private(model, "_prepare_attention_mask_for_generation")(input_ids, config, model_kwargs)


def prepare_generated_length(
    model, config, has_default_max_length: bool, has_default_min_length: bool, input_ids: torch.Tensor
):
    """`_prepare_generated_length` -> config whose max_length (and min_length) count the prompt:
    max_new_tokens / min_new_tokens become input length + them."""
    return _private(model, "_prepare_generated_length")(
        config, has_default_max_length, has_default_min_length, "input_ids", input_ids.shape[1], input_ids
    )


def logits_processor(model, config, input_length: int, row_ids, prefix_allowed_tokens_fn, model_kwargs):
    """`_get_logits_processor` -> the LogitsProcessorList HF would apply for this config (warpers
    included when sampling), built for one row: `row_ids` [1, L] and its attention mask in
    `model_kwargs` (repetition penalty reads the row's padding from it)."""
    return _private(model, "_get_logits_processor")(
        config,
        input_ids_seq_length=input_length,
        encoder_input_ids=row_ids,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        device=row_ids.device,
        model_kwargs=model_kwargs,
    )


def stopping_criteria(model, config, criteria, tokenizer):
    """`_get_stopping_criteria` -> HF's StoppingCriteriaList for this config: MaxLengthCriteria,
    EosTokenCriteria, StopStringCriteria (stop_strings with `tokenizer`), then the caller's."""
    return _private(model, "_get_stopping_criteria")(config, criteria, tokenizer)


def special_tokens(config) -> tuple[list[int] | None, int | None]:
    """(EOS ids, pad id) from the private config._eos_token_tensor / _pad_token_tensor that
    `prepare_special_tokens` set (None where the model has none)."""
    for name in ("_eos_token_tensor", "_pad_token_tensor"):
        if not hasattr(config, name):
            raise RuntimeError(
                f"transformers' GenerationConfig.{name} is gone (call prepare_special_tokens first): "
                f"saguaro's drop-in generate needs it (supported: transformers {TESTED_TRANSFORMERS})"
            )
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    return (
        None if eos is None else eos.reshape(-1).tolist(),
        None if pad is None else int(pad),
    )


def load_tensor_parallel(path, mesh, tp: int, **kwargs):
    """`from_pretrained(path, distributed_config=DistributedConfig(tp_size=tp, tp_plan="auto"))`, sharded
    over `mesh` (a TransformersDeviceMesh over some of the ranks) instead of the whole world.

    transformers builds its mesh from every rank of the process group (`initialize_distributed_mesh`,
    called by `prepare_distribute_model`), which leaves no rank for a drafter; for this one load
    the mesh it builds is ours, so its own tensor-parallel plan and loader shard the weights.
    """
    from transformers import AutoModelForCausalLM
    from transformers.distributed import mixin
    from transformers.distributed.configuration_utils import DistributedConfig

    builder = getattr(mixin, "initialize_distributed_mesh", None)
    if builder is None:
        raise RuntimeError(
            "transformers.distributed.mixin.initialize_distributed_mesh is gone: saguaro cannot shard a "
            f"target over part of the ranks (supported: transformers {TESTED_TRANSFORMERS})"
        )
    # As transformers' own: the device this rank computes on (its LOCAL_RANK's GPU, or the CPU).
    device = mesh.get_mesh("tp").device_type
    device = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    mixin.initialize_distributed_mesh = lambda config: (device, mesh)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, distributed_config=DistributedConfig(tp_size=tp, tp_plan="auto"), **kwargs
        )
    finally:
        mixin.initialize_distributed_mesh = builder
