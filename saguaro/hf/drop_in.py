"""Drop-in `model.generate`: `saguaro.enable(model, draft_model=draft)`, then call generate as usual.

`enable` puts a `generate` on the model instance that takes everything HF's does. HF itself turns
the call into a GenerationConfig (the model's defaults, then the caller's), logits processors and
stopping criteria, so semantics match by construction; saguaro then runs the decoding, applying
those processors to the target's scores at every verified position (each with its own history),
which keeps greedy output identical and sampling exact. A call it cannot serve exactly (beam
search, contrastive search, several return sequences, scores/attentions outputs, classifier-free
guidance, processors it does not know to depend only on earlier tokens, ...) goes to the original
HF generate with a one-time warning, or raises `UnsupportedGenerateCall` under strict=True.
"""

from __future__ import annotations

import types

import torch
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
)

from saguaro.api import SpeculativeGenerator
from saguaro.decode.sampling import SamplingConfig
from saguaro.faults import warn
from saguaro.hf import internals as hf

# HF processors whose scores at a position depend only on the tokens before it (and fixed
# settings): applying them per verified position gives exactly HF's scores.
SERVED_PROCESSORS = frozenset(
    {
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "TopHLogitsWarper",
        "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "SequenceBiasLogitsProcessor",
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "SuppressTokensLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor",
        "PrefixConstrainedLogitsProcessor",
        "LogitNormalization",
    }
)
# Model inputs that change nothing about decoding (or that saguaro rebuilds itself).
HARMLESS_MODEL_KWARGS = frozenset(
    {
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "position_ids",
        "cache_position",
        "logits_to_keep",
    }
)


class UnsupportedGenerateCall(ValueError):
    """A generate() call saguaro cannot serve exactly, under strict=True."""


def _unsupported_setting(config, batch: int, prefix_allowed_tokens_fn) -> str | None:
    """Why HF would decode this config differently from a single greedy/sampled sequence, or None."""
    if (config.num_beams or 1) > 1:
        return f"beam search (num_beams={config.num_beams})"
    if config.penalty_alpha is not None and config.penalty_alpha > 0:
        return "contrastive search (penalty_alpha)"
    if (config.num_return_sequences or 1) > 1:
        return f"num_return_sequences={config.num_return_sequences}"
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(config, flag, False):
            return f"{flag}=True"
    if config.guidance_scale is not None and config.guidance_scale != 1:
        return "classifier-free guidance (guidance_scale)"
    if getattr(config, "dola_layers", None) is not None:
        return "DoLa decoding (dola_layers)"
    if prefix_allowed_tokens_fn is not None and batch > 1:
        return "prefix_allowed_tokens_fn with batch > 1 (it is called with the batch index)"
    return None


def _has_inner_padding(attention_mask: torch.Tensor) -> bool:
    """True if some row has a masked position after an attended one (not plain left padding)."""
    attended = attention_mask.ne(0).long()
    return bool((attended.cummax(dim=1).values != attended).any())


class Enabled:
    """What `enable` returns: the patched model's state; a context manager that disables on exit."""

    def __init__(self, model, generator: SpeculativeGenerator, strict: bool):
        self.model, self.generator, self.strict = model, generator, strict
        self.had_instance_generate = "generate" in vars(model)
        self.original = model.generate  # the bound HF method (or whatever the instance had)
        self._warned: set[str] = set()

    def __getstate__(self) -> dict:
        # A copy of the model (deepcopy, pickle) copies this handle with it. HF's generate is
        # rebound to the copy on arrival: pickled as a bound method it would be looked up on the
        # half-built copy, and could resolve to this very wrapper.
        state = dict(vars(self))
        if not self.had_instance_generate:
            state["original"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        if self.original is None:
            self.original = types.MethodType(type(self.model).generate, self.model)

    def __enter__(self) -> Enabled:
        return self

    def __exit__(self, *exc) -> None:
        disable(self.model)

    def _fall_back(self, reason: str, call):
        if self.strict:
            raise UnsupportedGenerateCall(
                f"saguaro cannot serve {reason} exactly; drop it, or enable without strict=True to let HF "
                "generate handle such calls"
            )
        if reason not in self._warned:
            self._warned.add(reason)
            warn(f"saguaro: {reason} is not served speculatively; this call runs HF generate", stacklevel=3)
        return call()

    @torch.no_grad()
    def generate(
        self,
        inputs=None,
        generation_config=None,
        logits_processor=None,
        stopping_criteria=None,
        prefix_allowed_tokens_fn=None,
        synced_gpus=None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
        custom_generate=None,
        **kwargs,
    ):
        model = self.model

        def original():
            return self.original(
                inputs,
                generation_config,
                logits_processor,
                stopping_criteria,
                prefix_allowed_tokens_fn,
                synced_gpus,
                assistant_model,
                streamer,
                negative_prompt_ids,
                negative_prompt_attention_mask,
                custom_generate,
                **kwargs,
            )

        explicit = {
            "assistant_model": assistant_model,
            "custom_generate": custom_generate,
            "negative_prompt_ids": negative_prompt_ids,
            "synced_gpus": synced_gpus,
            "inputs_embeds": kwargs.get("inputs_embeds"),
        }
        for name, value in explicit.items():
            if value is not None and value is not False:
                return self._fall_back(name, original)
        if logits_processor:
            return self._fall_back(
                "a caller-supplied logits_processor (saguaro calls processors once per "
                "verified position, which a stateful one would not expect)",
                original,
            )

        user_kwargs = dict(kwargs)
        tokenizer = user_kwargs.pop("tokenizer", None)
        has_default_max_length = (
            user_kwargs.get("max_length") is None
            and (generation_config is None or generation_config.max_length is None)
            and model.generation_config.max_length is None
        )
        has_default_min_length = (
            user_kwargs.get("min_length") is None
            and (generation_config is None or generation_config.min_length is None)
            and model.generation_config.min_length is None
        )
        config, model_kwargs = hf.prepare_generation_config(model, generation_config, user_kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError(
                "pass the prompt as input_ids (or the first argument); saguaro needs at least one "
                "prompt token"
            )
        input_ids = torch.as_tensor(input_ids)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        attention_mask = model_kwargs.pop("attention_mask", None)
        extra = {k for k, v in model_kwargs.items() if v is not None and k not in HARMLESS_MODEL_KWARGS}
        if extra:
            return self._fall_back(f"model inputs {sorted(extra)}", original)
        reason = _unsupported_setting(config, input_ids.shape[0], prefix_allowed_tokens_fn)
        if reason:
            return self._fall_back(reason, original)

        hf.prepare_special_tokens(model, config, attention_mask is not None, input_ids)
        if attention_mask is None:  # as HF: padding tokens in the input are masked
            attention_mask = hf.infer_attention_mask(model, input_ids, config, model_kwargs)
            if _has_inner_padding(attention_mask):
                # HF then attends around a pad token inside a prompt; saguaro's rows take only
                # left padding, so HF serves the call (an explicit attention_mask avoids this).
                return self._fall_back("a prompt with pad_token_id inside it and no attention_mask", original)
        length = input_ids.shape[1]
        config = hf.prepare_generated_length(
            model, config, has_default_max_length, has_default_min_length, input_ids
        )
        # Per row: some processors read the row's padding from the mask (repetition penalty skips it).
        processors = [
            hf.logits_processor(
                model,
                config,
                length,
                row_ids,
                prefix_allowed_tokens_fn,
                {**model_kwargs, "attention_mask": row_mask},
            )
            for row_ids, row_mask in zip(input_ids.split(1), attention_mask.split(1))
        ]
        unknown = sorted({type(p).__name__ for p in processors[0]} - SERVED_PROCESSORS)
        if unknown:
            return self._fall_back(f"logits processors {unknown}", original)
        criteria = StoppingCriteriaList(
            c
            for c in hf.stopping_criteria(
                model, config, stopping_criteria or StoppingCriteriaList(), tokenizer
            )
            if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))  # saguaro's own StopRule does these
        )
        max_new_tokens = config.max_length - length
        if max_new_tokens < 1:
            raise ValueError(
                f"max_length={config.max_length} leaves no room after the {length}-token input; "
                "use max_new_tokens= to say how many tokens to generate"
            )
        eos, pad = hf.special_tokens(config)
        sampling = SamplingConfig(
            bool(config.do_sample),
            1.0 if config.temperature is None else config.temperature,
            config.top_k,
            config.top_p,
        )
        return self.generator.generate(
            input_ids,
            max_new_tokens,
            sampling.do_sample,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
            eos if eos is not None else [],
            bool(config.return_dict_in_generate),
            None,
            attention_mask=attention_mask,
            pad_token_id=pad,
            logits_processor=processors if processors[0] else None,
            stopping_criteria=criteria or None,
            streamer=streamer,
        )


def enable(model, draft_model=None, method: str = "auto", strict: bool = False, **options) -> Enabled:
    """Make `model.generate(...)` speculative with saguaro; `disable(model)` (or leaving the returned
    handle's `with` block) restores HF's. Options are SpeculativeGenerator's (num_speculative_tokens,
    tree_branching, placement, draft_device, ...). strict=True raises `UnsupportedGenerateCall` for
    calls HF would have to serve, and a drafter worker's failure instead of drafting inline."""
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); load the model with AutoModelForCausalLM")
    disable(model)
    # strict also means no silent inline drafting after a worker failure.
    handle = Enabled(
        model, SpeculativeGenerator(model, draft_model, method, strict=strict, **options), strict
    )
    model.generate = handle.generate
    model._saguaro = handle
    return handle


def disable(model) -> bool:
    """Restore the model's own generate and stop saguaro's worker; False if it was not enabled."""
    handle = vars(model).get("_saguaro")
    if handle is None:
        return False
    del model._saguaro
    if handle.had_instance_generate:
        model.generate = handle.original
    else:
        del model.generate
    handle.generator.close()
    return True
