"""Process groups and model wrapping: one code path for one device and for ``torchrun``.

The model knows nothing about distribution (torchtitan habit): :func:`init` reads the
``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), and :func:`wrap` returns
the model to train -- the model itself on one process, DDP across processes, or, when
``train.parallel=fsdp``, the model sharded by :mod:`ultramem.distributed.parallelize` (memory
tables split over ``train.memory_parallel`` ranks, FSDP2 per block for the rest). The trainer
checkpoints a sharded model through :mod:`ultramem.distributed.checkpoint` (DCP: each rank
writes its shards; reshards on load) and an unsharded one as full weights (:mod:`ultramem.checkpoint`).

    torchrun --nproc_per_node 2 -m ultramem.cli train --preset tiny-dense --out runs/x
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ultramem import checkpoint as ckpt
from ultramem.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def wrap(model: nn.Module, d: Dist, parallel: str = "ddp", memory_parallel: int = 1,
         memory_partition: str = "auto", memory_overlap: bool = False) -> nn.Module:
    """The module to call in the training loop (the unwrapped model stays the one to save).

    ``fsdp``: :func:`ultramem.distributed.parallelize.parallelize` on the ``(mp, dp)`` mesh with
    ``mp = memory_parallel``: value tables split over ``mp`` (``memory_partition``) and kept out
    of FSDP, everything else ``fully_shard``-ed per block over ``dp``; ``memory_overlap``: memory
    spans on a side stream (:mod:`ultramem.distributed.overlap`; CUDA only, nothing on the CPU)."""
    if not d.enabled:
        return model
    if parallel == "ddp":
        if memory_parallel > 1:
            raise ConfigError("train.memory_parallel > 1 needs train.parallel=fsdp")
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if parallel == "fsdp":
        from ultramem.distributed.parallelize import make_mesh, parallelize  # noqa: PLC0415

        parallelize(model, make_mesh(memory_parallel, d.device.type), partition=memory_partition,
                    overlap=memory_overlap)
        return model
    raise ConfigError(f"train.parallel={parallel!r}; allowed: 'ddp', 'fsdp'")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimiser state dicts; a collective when sharded
    (every rank must call it)."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (  # noqa: PLC0415
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimiser state dict: keyed by parameter name (as :func:`full_state_dicts`
    writes it for a sharded model) or by position (``optimizer.state_dict()``, one process);
    moments saved in an older parameter layout are upgraded first (checkpoint.upgrade_optimizer_state)."""
    state = ckpt.upgrade_optimizer_state(model, optimizer, state)
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # noqa: PLC0415

    if any(isinstance(k, int) for k in state.get("state", {})) or any(
            isinstance(i, int) for g in state.get("param_groups", []) for i in g["params"]):
        state = _keyed_by_name(model, optimizer, state)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _keyed_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A positional optimiser state dict (a one-process checkpoint resumed sharded) keyed by
    parameter name instead: position ``i`` is the ``i``-th parameter of ``optimizer``'s groups,
    the order ``optimizer.load_state_dict`` assumes too (same config, same groups)."""
    order = ckpt.optimizer_param_names(model, optimizer)
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise CheckpointError(f"the checkpoint's optimiser state has {sum(len(g['params']) for g in state['param_groups'])} "
                              f"parameters, the model {len(order)}; was the config changed?")
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world
    return x


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
