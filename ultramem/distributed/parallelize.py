"""Shard a built model over a ``(mp, dp)`` DeviceMesh: memory tables over ``mp``, FSDP2 over ``dp``.

The model knows nothing about distribution (torchtitan habit). :func:`parallelize`

1. finds the value tables by watching one tiny forward: every layer with a ``lookup`` hook
   (``RetrievalLayer.lookup``, UltraMem and UltraMemV2) shows which parameters it passes as
   ``values`` / ``pre_values`` and with which shapes (a shared V2 pool is one table read by
   every layer);
2. picks each table's partition (``"row"`` / ``"col"``) from the byte formulas of
   :mod:`ultramem.distributed.volume` unless given, replaces each table parameter by a DTensor
   ``(Shard(0 | 1), Replicate())`` on the mesh (this rank keeps its shard) and the layers'
   ``lookup`` by a :class:`~ultramem.distributed.sharded_lookup.ShardedLookup`;
3. applies ``fully_shard`` to each block, each memory layer (tables ignored) and the root,
   on the same mesh: HSDP -- dense parameters sharded over ``dp``, replicated over ``mp``.

Every rank sees different tokens (data parallel over all ``dp * mp`` ranks). Gradients are the
data-parallel average over the world: FSDP2 averages the dense ones; a table shard's gradient
(summed over its ``mp`` group by the lookup's backward) is summed over ``dp`` and divided by the
world size in a gradient hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ultramem.distributed.overlap import Streams, overlap_memory
from ultramem.distributed.sharded_lookup import PARTITIONS, ShardedLookup, _core_slice
from ultramem.distributed.volume import LookupShape, choose_partition
from ultramem.errors import ConfigError


def make_mesh(mp: int, device_type: str | None = None) -> DeviceMesh:
    """The ``(mp, dp)`` mesh over every rank, ``dp = world / mp``; the ranks of one ``mp``
    group are consecutive (``rank = dp_index * mp + mp_index``: put a group on one node).

    Dimension order: FSDP2 on a 2-D mesh replicates over dim 0 and shards over dim 1, so
    ``mp`` comes first for the dense parameters to be sharded over ``dp``. ``device_type``
    defaults to the process group's (NCCL: cuda, gloo: cpu)."""
    world = dist.get_world_size()
    if mp <= 0 or world % mp:
        raise ConfigError(f"mp={mp} must divide the world size {world}; allowed: "
                          + ", ".join(str(k) for k in range(1, world + 1) if world % k == 0))
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    ranks = torch.arange(world).view(world // mp, mp).T  # [mp, dp]
    return DeviceMesh(device_type, ranks, mesh_dim_names=("mp", "dp"))


@dataclass
class Table:
    """One sharded table: its parameters' owners, partition and the lookups that read it."""

    name: str  # FQN of the values parameter
    partition: str
    params: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)  # FQN -> (module, attr)
    shapes: list[LookupShape] = field(default_factory=list)
    layers: list[nn.Module] = field(default_factory=list)


@dataclass
class ParallelPlan:
    mesh: DeviceMesh
    tables: list[Table]
    overlapped: int = 0  # memory layers on the side stream (overlap=...)

    def partitions(self) -> dict[str, str]:
        return {t.name: t.partition for t in self.tables}


def _lookup_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(type(m), "lookup")]


@torch.no_grad()
def probe_lookups(model: nn.Module, tokens: int = 4) -> dict[nn.Module, tuple[dict, LookupShape]]:
    """Run one forward of ``tokens`` tokens (eval mode: no dropout, no RNG used, no norm
    statistics updated) and record, per hooked layer, the tables it passed and the call's shape."""
    seen: dict[nn.Module, tuple[dict, LookupShape]] = {}
    layers = _lookup_layers(model)

    def recorder(layer: nn.Module):
        def call(values, idx, scores, block=None, num_blocks=1, pre_values=None, pre_query=None,
                 activation="identity", impl="auto"):
            cores = scores.shape[-1] if scores.dim() == 3 else 1
            shape = LookupShape(tokens=idx.shape[0], selections=idx.shape[1], cores=cores,
                                blocks=num_blocks if block is not None else 1, value_dim=values.shape[1],
                                pre_value_dim=pre_values.shape[1] if pre_values is not None else 0,
                                value_bytes=values.element_size())
            seen[layer] = ({"values": values, "pre_values": pre_values}, shape)
            return type(layer).lookup(values, idx, scores, block, num_blocks, pre_values, pre_query,
                                      activation, impl)
        return call

    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            layer.lookup = recorder(layer)
        device = next(model.parameters()).device
        model(torch.zeros(1, tokens, dtype=torch.long, device=device))
    finally:
        for layer in layers:
            del layer.lookup
        model.train(was_training)
    return seen


def _check(table: Table, mp: int) -> None:
    for fqn, (mod, attr) in table.params.items():
        p = getattr(mod, attr)
        dim = 0 if table.partition == "row" else 1
        if p.shape[dim] % mp:
            what = "rows" if dim == 0 else "columns"
            other = "col" if dim == 0 else "row"
            raise ConfigError(f"{fqn}: {p.shape[dim]} {what} do not split over mp={mp}; "
                              f"use partition='{other}' or an mp size dividing {p.shape[dim]}")
    if table.partition == "col":
        for s in table.shapes:
            _core_slice(s.cores, mp, 0)


def _shard_param(mod: nn.Module, attr: str, mesh: DeviceMesh, dim: int) -> nn.Parameter:
    p = getattr(mod, attr)
    dt = distribute_tensor(p.detach(), mesh, [Shard(dim), Replicate()])
    new = nn.Parameter(dt, requires_grad=p.requires_grad)
    setattr(mod, attr, new)
    return new


def _average_over_world(param: nn.Parameter, mesh: DeviceMesh) -> None:
    """Table gradients: sum over ``dp`` (the shard's replicas), then / world size."""
    dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None
    world = mesh.size()

    def hook(grad: DTensor) -> DTensor:
        local = grad.to_local().clone()
        if dp_group is not None:
            dist.all_reduce(local, group=dp_group)
        local.div_(world)
        return DTensor.from_local(local, grad.device_mesh, grad.placements, run_check=False,
                                  shape=grad.shape, stride=grad.stride())

    param.register_hook(hook)


def parallelize(model: nn.Module, mesh: DeviceMesh, partition: str | dict[str, str] = "auto",
                fsdp: bool = True, reshard_after_forward: bool = True,
                overlap: bool | Streams = False) -> ParallelPlan:
    """Shard ``model`` (built and initialised, identical on every rank) in place; returns the plan.

    ``partition``: ``"auto"`` (fewest bytes, :func:`~ultramem.distributed.volume.choose_partition`),
    ``"row"``, ``"col"``, or ``{table FQN: "row" | "col"}`` (unlisted tables: auto).
    ``overlap``: memory layers on a side stream (:mod:`ultramem.distributed.overlap`; ``True``:
    CUDA streams on a CUDA model, nothing elsewhere; a :class:`Streams`: those)."""
    if tuple(mesh.mesh_dim_names or ()) != ("mp", "dp"):
        raise ConfigError(f"parallelize needs the ('mp', 'dp') mesh of make_mesh, got {mesh.mesh_dim_names}")
    mp_mesh = mesh["mp"]
    mp = mp_mesh.size()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    owners = {id(p): (mod, attr) for mod in model.modules() for attr, p in mod._parameters.items() if p is not None}
    tables: dict[int, Table] = {}
    for layer, (params, shape) in probe_lookups(model).items():
        key = id(params["values"])
        if key not in tables:
            tables[key] = Table(names[key], "auto")
            for p in params.values():
                if p is not None:
                    tables[key].params[names[id(p)]] = owners[id(p)]
        tables[key].shapes.append(shape)
        tables[key].layers.append(layer)
    plan_tables = list(tables.values())
    for t in plan_tables:
        want = partition.get(t.name, "auto") if isinstance(partition, dict) else partition
        if want not in (*PARTITIONS, "auto"):
            raise ConfigError(f"partition={want!r} for {t.name}; allowed: auto, {', '.join(PARTITIONS)}")
        t.partition = choose_partition(t.shapes, mp) if want == "auto" else want
        _check(t, mp)
    if isinstance(partition, dict):
        unknown = set(partition) - {t.name for t in plan_tables}
        if unknown:
            raise ConfigError(f"partition names {sorted(unknown)}: no such table; tables: "
                              + ", ".join(t.name for t in plan_tables))

    sharded: set[nn.Parameter] = set()
    for t in plan_tables:
        dim = 0 if t.partition == "row" else 1
        for mod, attr in t.params.values():
            p = _shard_param(mod, attr, mesh, dim)
            _average_over_world(p, mesh)
            sharded.add(p)
        op = ShardedLookup(t.partition, mp_mesh.get_group())
        for layer in t.layers:
            layer.lookup = op

    if fsdp:
        kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
        for block in model.blocks:
            fully_shard(block, **kw)  # one unit per model.blocks[i] (Block.forward)
        for layer in getattr(model, "memory", []):
            if any(p not in sharded for p in layer.parameters()):
                fully_shard(layer, ignored_params=sharded, **{**kw, "reshard_after_forward": (
                    reshard_after_forward and overlap is False)})
        # The root unit (embedding, tied head, final norm) never reshards after forward: backward
        # needs it at once, and FSDP2 re-gathers a resharded unit from hooks on its forward's
        # output tensors, which it cannot find inside the ModelOutput dataclass (torch 2.11 on CUDA:
        # "storage of size 0" in the tied head's backward). FSDP2's own default for the root.
        fully_shard(model, ignored_params=sharded, **{**kw, "reshard_after_forward": False})
    overlapped = 0
    if overlap is not False:
        overlapped = overlap_memory(model, None if overlap is True else overlap)
    return ParallelPlan(mesh, plan_tables, overlapped)

