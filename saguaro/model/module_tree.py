"""Shallow copies of module trees: swap submodules in a copy, share every tensor with the original."""

from __future__ import annotations

import copy

from torch import nn


class AcceleratedModuleError(ValueError):
    """A module with accelerate hooks (device_map=...): a copy would keep running the original."""


def clone_module_tree(module: nn.Module, memo: dict | None = None, share_hooks: bool = False) -> nn.Module:
    """A copy of `module` in which every submodule is a new object with its own parameter, buffer,
    submodule and hook dicts, while the tensors themselves are shared (nothing is copied). Swapping
    a submodule of the copy leaves the original untouched; a module reached twice stays shared.
    `share_hooks`: each copy keeps its original's hook dicts, so hooks registered on the original
    later (a profiler, a trace) run in the copy too."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    if getattr(module, "_hf_hook", None) is not None:
        raise AcceleratedModuleError(
            "the module carries accelerate hooks (loaded with device_map=...), which would keep running "
            "the original modules"
        )
    clone = copy.copy(module)
    memo[id(module)] = clone
    for key, value in vars(module).items():
        if isinstance(value, dict) and not (share_hooks and "hooks" in key):
            clone.__dict__[key] = copy.copy(value)
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = clone_module_tree(child, memo, share_hooks)
    return clone


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
