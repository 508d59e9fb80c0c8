"""Structural re-parameterisation (opt-in): a block whose output is the sum of conv branches and
identity branches on one input (RepVGG, MobileOne) is replaced by one conv.

Read-only: ``plan_merges`` finds the blocks and builds each replacement (a new conv, or a
Sequential of the conv and what the block applies after the sum); the fuse pass installs them.
A merge is exact only where every branch sees the same input positions: convs with odd kernels,
'same'-style zero padding (k // 2), the same stride and groups, no dilation; an identity branch
(the input itself, or a BatchNorm of it) needs stride 1 and as many outputs as inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from convfuse.fold.arithmetic import bn_scale_shift, fuse_conv_bn_weights
from convfuse.fold.norms import NormNotFoldable, analyse_norm, as_sequence, as_step
from convfuse.fold.proofs import Stats, norm_proven
from convfuse.fold.table import PATTERNS, has_hooks, is_norm, is_producer, overrides_forward
from convfuse.graphs.fx_match import is_add, real_users, sum_terms, through_identities
from convfuse.graphs.fx_pairs import Observation
from convfuse.graphs.tracing import trace_model
from convfuse.verify import remainders

__all__ = ["Merge", "plan_merges"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAX_BRANCHES = 16


@dataclass
class Merge:
    """One block to replace: ``replacement`` computes what ``module`` computed."""

    module: str
    kind: str
    branches: int
    kernel: tuple[int, ...]
    norms: list[str] = field(default_factory=list)  # BatchNorms folded away with the block
    replacement: nn.Module | None = None


@dataclass
class _Branch:
    conv: nn.Module | None  # None: an identity branch
    stats: Stats | None  # a BatchNorm after the conv (or of the input, for identity)
    norm_name: str | None


def plan_merges(model: nn.Module, observation: Observation | None) -> list[Merge]:
    """Every block of ``model`` (below its root) that can be merged into one conv, outermost first."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    merges: list[Merge] = []
    taken: list[str] = []
    for name, block in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken) or not _candidate(block):
            continue
        if len(names[id(block)]) > 1 or has_hooks(block):
            continue
        if observation is not None and observation.calls[name] != 1:
            continue
        merge = _plan(name, block, observation)
        if merge is not None:
            merges.append(merge)
            taken.append(name)
    return merges


def _candidate(block: nn.Module) -> bool:
    if is_norm(block) or is_producer(block) or type(block).forward is nn.Module.forward:
        return False
    if isinstance(block, nn.Sequential) and not overrides_forward(block, nn.Sequential):
        return False
    convs = sum(1 for m in block.modules() if isinstance(m, _CONVS))
    return 1 <= convs <= _MAX_BRANCHES


def _plan(name: str, block: nn.Module, observation: Observation | None) -> Merge | None:
    tracing = trace_model(block, keep=lambda m: is_norm(m) or is_producer(m))
    if tracing.untraced or len(tracing.graphs) != 1:
        return None
    graph = tracing.graphs[0].graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    x = placeholders[0]
    output = next(n for n in graph.nodes if n.op == "output")
    modules = dict(block.named_modules())
    chain, total = _chain_back(output.args[0])
    if total is None or any(real_users(n) != 1 for n in chain):
        return None
    between: list[fx.Node] = [total]
    terms = sum_terms(modules, total, between)
    if any(real_users(n) != 1 for n in between):
        return None
    branches = [_branch(modules, term, x) for term in terms]
    if any(b is None for b in branches) or len(branches) < 2:
        return None
    found = [b for b in branches if b is not None]
    convs = [b.conv for b in found if b.conv is not None]
    if not convs or not _compatible(convs, identity=any(b.conv is None for b in found)):
        return None
    steps = [as_step(block, node) for node in chain]
    if any(step is None for step in steps):
        return None
    merged = _merged_conv(found, convs)
    if merged is None:
        return None
    merged.training = block.training
    replacement = as_sequence([("conv", merged), *[s for s in steps if s is not None]]) if steps else merged
    replacement.training = block.training
    return Merge(
        module=name,
        kind=type(block).__name__,
        branches=len(found),
        kernel=tuple(merged.kernel_size),
        norms=[f"{name}.{b.norm_name}" for b in found if b.norm_name],
        replacement=replacement,
    )


def _chain_back(value: object) -> tuple[list[fx.Node], fx.Node | None]:
    """The one-input nodes after the sum (in forward order), and the sum itself."""
    chain: list[fx.Node] = []
    while isinstance(value, fx.Node) and not is_add(value):
        if value.op == "placeholder" or len(value.all_input_nodes) != 1 or value.args[:1] != (value.all_input_nodes[0],):
            return chain, None
        chain.append(value)
        value = value.args[0]
    chain.reverse()
    return chain, value if isinstance(value, fx.Node) else None


def _plain(module: nn.Module, base: type[nn.Module]) -> bool:
    return not overrides_forward(module, base) and not has_hooks(module) and not parametrize.is_parametrized(module)


def _branch(modules: dict[str, nn.Module], term: object, x: fx.Node) -> _Branch | None:
    """What one summand computes from ``x``: a conv (maybe then a BatchNorm), a BatchNorm of ``x``, or ``x``."""
    skipped: list[fx.Node] = []
    node = through_identities(modules, term, skipped)
    stats: Stats | None = None
    norm_name = None
    if isinstance(node, fx.Node) and node.op == "call_module" and is_norm(modules[node.target]):
        if real_users(node) != 1:
            return None
        stats = _norm_stats(modules[node.target])
        if stats is None:
            return None
        norm_name = node.target
        node = through_identities(modules, node.args[0], skipped)
    if any(real_users(n) != 1 for n in skipped):
        return None
    if node is x:
        return _Branch(None, stats, norm_name)
    if isinstance(node, fx.Node) and node.op == "call_module" and node.args[:1] == (x,) and len(node.args) == 1:
        conv = modules[node.target]
        if type(conv) in _CONVS and _plain(conv, type(conv)) and real_users(node) == 1:
            return _Branch(conv, stats, norm_name)
    return None


def _norm_stats(norm: nn.Module) -> Stats | None:
    """What a BatchNorm in a branch computes, where it only normalises (proven for subclasses)."""
    base = next((p.norm for p in PATTERNS if isinstance(norm, p.norm)), None)
    if base is None or norm.training or getattr(norm, "running_mean", None) is None:
        return None
    if has_hooks(norm) or parametrize.is_parametrized(norm):
        return None
    custom = overrides_forward(norm, base)
    try:
        fold = analyse_norm(norm, custom)
    except NormNotFoldable:
        return None
    if not fold.normalises_only or (custom and not norm_proven(norm, fold, None)):
        return None
    return fold.running_mean, fold.running_var, fold.eps, fold.weight, fold.bias


def _compatible(convs: list[nn.Module], *, identity: bool) -> bool:
    first = convs[0]
    for conv in convs:
        if type(conv) is not type(first) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return False
        same = (conv.in_channels, conv.out_channels, conv.stride, conv.groups)
        if same != (first.in_channels, first.out_channels, first.stride, first.groups):
            return False
        if any(d != 1 for d in conv.dilation) or any(k % 2 == 0 for k in conv.kernel_size):
            return False
        if tuple(conv.padding) != tuple(k // 2 for k in conv.kernel_size):
            return False
        if not conv.weight.is_floating_point():
            return False
    if identity and (first.in_channels != first.out_channels or any(s != 1 for s in first.stride)):
        return False
    return True


def _merged_conv(branches: list[_Branch], convs: list[nn.Module]) -> nn.Module | None:
    """One conv computing the sum of the branches, with weights summed in float64."""
    largest = max(convs, key=lambda c: tuple(c.kernel_size))
    kernel = tuple(max(c.kernel_size[i] for c in convs) for i in range(len(largest.kernel_size)))
    if tuple(largest.kernel_size) != kernel:
        return None
    out_channels, per_group = largest.out_channels, largest.in_channels // largest.groups
    weight = torch.zeros(out_channels, per_group, *kernel, dtype=torch.float64, device=largest.weight.device)
    bias = torch.zeros(out_channels, dtype=torch.float64, device=largest.weight.device)
    for branch in branches:
        w, b = _branch_weights(branch, out_channels, per_group, kernel, weight.device)
        weight += w
        bias += b
    merged = copy.deepcopy(largest)
    with torch.no_grad():
        merged.weight = nn.Parameter(weight.to(largest.weight.dtype), requires_grad=largest.weight.requires_grad)
        merged.bias = nn.Parameter(bias.to(largest.weight.dtype), requires_grad=largest.weight.requires_grad)
    remainders.keep(merged.weight, weight)
    remainders.keep(merged.bias, bias)
    return merged


def _branch_weights(
    branch: _Branch, out_channels: int, per_group: int, kernel: tuple[int, ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    if branch.conv is None:  # the identity, as a conv: 1 at the centre, input channel = output channel
        weight = torch.zeros(out_channels, per_group, *kernel, dtype=torch.float64, device=device)
        centre = tuple(k // 2 for k in kernel)
        for channel in range(out_channels):
            weight[(channel, channel % per_group, *centre)] = 1.0
        bias = torch.zeros(out_channels, dtype=torch.float64, device=device)
        if branch.stats is None:
            return weight, bias
        scale, shift = bn_scale_shift(*branch.stats)
        return weight * scale.reshape(-1, *([1] * (len(kernel) + 1))), shift
    conv = branch.conv
    conv_w, conv_b = remainders.exact(conv.weight), remainders.exact(conv.bias)  # as folded, in float64
    if branch.stats is not None:
        weight, bias = fuse_conv_bn_weights(conv_w, conv_b, *branch.stats, groups=conv.groups)
    else:
        weight = conv_w.double()
        bias = conv_b.double() if conv_b is not None else torch.zeros(out_channels, dtype=torch.float64, device=device)
    padding: list[int] = []
    for k, target in zip(reversed(conv.kernel_size), reversed(kernel)):
        padding += [(target - k) // 2] * 2
    return F.pad(weight, padding), bias
