"""`saguaro bench --random-weights`: step costs of same-shape random models on a device (a GPU,
typically), and the speedups they imply with acceptance measured elsewhere, labelled projected."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from saguaro.bench.environment import cpu_model
from saguaro.bench.summary import project
from saguaro.bench.workload import STEP_TOKENS
from saguaro.faults import logger
from saguaro.kernels import TREE_BACKENDS, TreeBackendUnavailable, choose_tree_backend
from saguaro.tune import step_costs


def random_weights_benchmark(args) -> dict:
    """Step costs of same-shape random models on `args.device` (a GPU, typically), and the speedups
    they imply with acceptance measured elsewhere (a CPU results.json): labelled projected."""
    dtype = getattr(torch, args.dtype)
    target = step_costs.random_weights_model(args.target, dtype, args.device)
    draft = step_costs.random_weights_model(args.draft, dtype, args.device)
    threads = torch.get_num_threads()
    curves = {
        "target@1": step_costs.forward_costs(target, list(STEP_TOKENS), args.step_repeats),
        "draft@1": step_costs.forward_costs(draft, list(STEP_TOKENS) + [48, 64], args.step_repeats),
    }
    curves[f"target@{threads}"], curves[f"draft@{threads}"] = curves["target@1"], curves["draft@1"]
    trees = [[1, 1, 1, 1], [2, 2, 1, 1], [4, 2, 2, 1], [4, 4, 2, 2, 1]]
    attention = {"sdpa": step_costs.tree_verify_costs(target, trees, args.step_repeats)}
    if args.device.startswith("cuda"):
        from saguaro.kernels.hf_attention import register_hf_attention

        for backend in TREE_BACKENDS:  # attn_implementation="saguaro_tree..." for the models below
            register_hf_attention(backend)

        kernel_target = step_costs.random_weights_model(args.target, dtype, args.device, "saguaro_tree")
        attention["saguaro_tree"] = step_costs.tree_verify_costs(kernel_target, trees, args.step_repeats)
        try:  # csrc/'s kernel, built just in time where nvcc is found (setup.py may have built it)
            choose_tree_backend("cuda", torch.device(args.device))
        except TreeBackendUnavailable as error:
            logger.warning("tree verify costs without the CUDA kernel: %s", error)
        else:
            kernel_target.set_attn_implementation("saguaro_tree_cuda")
            costs = step_costs.tree_verify_costs(kernel_target, trees, args.step_repeats)
            attention["saguaro_tree_cuda"] = costs
    measured = json.loads(Path(args.acceptance_from).read_text()) if args.acceptance_from else None
    acceptance = measured["projection"]["acceptance_per_position"] if measured else [0.7] * 8
    hit_rate = measured["projection"]["hit_rate"] if measured else 0.8
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    return {
        "setup": {
            "mode": "random weights (step costs only; speeds are projected)",
            "device": device_name,
            "target_config": args.target,
            "draft_config": args.draft,
            "dtype": args.dtype,
            "acceptance_from": args.acceptance_from or "assumed 0.7 per position, hit rate 0.8",
            "torch": torch.__version__,
            "copy_bandwidth_bytes_per_second": step_costs.copy_bandwidth(args.device),
            "target_bytes": step_costs.model_bytes(target),
        },
        "step_costs": {name: curve.as_dict() for name, curve in curves.items() if name.endswith("@1")},
        "tree_verify_seconds": attention,
        "projection": project(curves, threads, acceptance, hit_rate),
    }
