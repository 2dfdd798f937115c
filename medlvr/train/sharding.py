"""Sharded training with torch's FSDP2 (`fully_shard`), switched on by `model.sharding=fsdp2`.

Why not accelerate's FSDP path: accelerate (1.16) picks FSDP only on accelerator devices; on
CPU processes it always runs DDP (`DistributedType.MULTI_CPU`) whatever the FSDP config says.
So medlvr shards the model itself, with torch's own API and nothing else, on CPU and GPU alike:

- `shard`: every decoder layer and vision block (the family's `BackboneAdapter.shard_units`)
  is an FSDP unit; the `LatentVLM` is the root unit, which holds the rest (embeddings and
  the latent token rows, output head, merger, latent projector, pause inputs, LoRA's
  trainable tokens). Every trained parameter becomes a `DTensor` sharded over the
  processes, and its gradient and AdamW moments with it. One process shards nothing.
- `gathered`: generation (rollouts, validation) with the whole model gathered once; the
  processes generate answers of different lengths, so per-layer gathering would not line up.
- `ShardedState`: the checkpoint's trained parameters and optimizer state, each process
  writing its own shards with torch.distributed.checkpoint in its safetensors format
  (`HuggingFaceStorageWriter`, no pickle: the default `FileSystemWriter` pickles its
  `.metadata` file). The files record each shard's offsets, so a checkpoint resumes on
  any number of processes.
- `plain_copy`: the full model gathered into an ordinary `LatentVLM` on the main process,
  for the export (`output_dir/final`, safetensors).

The loops need no other change: FSDP2 averages gradients over processes like DDP (the
loops scale the loss by the process count), and gradient clipping sums the shards' norms.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

SHARDED_DIR = "sharded"  # inside a checkpoint: the DCP files, one per process

_plain_builders: weakref.WeakKeyDictionary[nn.Module, Callable[[], Any]] = (
    weakref.WeakKeyDictionary()
)
_kept: weakref.WeakKeyDictionary[nn.Module, None] = (
    weakref.WeakKeyDictionary()
)  # units gathered until `release`


def configured(cfg: Any) -> bool:
    """Whether the run is set up for sharding (its checkpoints are then `ShardedState`s)."""
    return cfg.model.sharding == "fsdp2"


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def shard(vlm: Any, cfg: Any, accelerator: Any, plain: Callable[[], Any] | None = None) -> Any:
    """Under `model.sharding=fsdp2`, shard `vlm` in place over the launch's processes (before
    the optimizer is built); otherwise, or with one process, leave it as it is.

    `plain()` builds the same model unsharded (the export loads the gathered weights into it).
    """
    if not configured(cfg) or accelerator.num_processes == 1:
        return vlm
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    vlm.to(accelerator.device)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    # Under bf16 autocast the layers are gathered (and compute) in bf16, gradients reduced in fp32.
    bf16 = accelerator.mixed_precision == "bf16"
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    decoder = set(vlm.adapter.decoder_layers(vlm.base_model))
    for unit in vlm.adapter.shard_units(vlm.base_model):
        # Decoder layers stay gathered from forward to the optimizer step (`release`): the latent
        # loop calls each layer K + 2 times on one KV cache, and backward reaches an earlier
        # call's key/value projections through the cache, before FSDP would gather them again.
        fully_shard(unit, mesh=mesh, reshard_after_forward=unit not in decoder, mp_policy=policy)
        if unit in decoder:
            unit.set_reshard_after_backward(False)
            _kept[unit] = None
    fully_shard(vlm, mesh=mesh, mp_policy=policy)
    # Entered without forward (rollouts, teacher forcing's targets): the root's parameters gather
    # for them too, and the root is the first unit to run (FSDP finds its root that way).
    for method in ("generate", "visual_tokens"):
        register_fsdp_forward_method(vlm, method)
    if plain is not None:
        _plain_builders[vlm] = plain
    return vlm


def state_of(cfg: Any, vlm: nn.Module, optimizer: torch.optim.Optimizer) -> ShardedState | None:
    """What a checkpoint of this run writes and resumes in shards (None without `model.sharding`)."""
    return ShardedState(vlm, optimizer) if configured(cfg) else None


def prepare(accelerator: Any, vlm: nn.Module, *rest: Any) -> tuple[Any, ...]:
    """`accelerator.prepare` for the model and the rest, except that a sharded model stays as it is
    (accelerate would wrap it in DDP on CPU processes)."""
    if not is_sharded(vlm):
        out = accelerator.prepare(vlm, *rest)
        return out if isinstance(out, tuple) else (out,)
    for opt in rest:
        if isinstance(opt, torch.optim.Optimizer):
            opt.register_step_pre_hook(lambda *_: release(vlm))
    if not rest:
        return (vlm,)
    out = accelerator.prepare(*rest)
    return (vlm, *(out if isinstance(out, tuple) else (out,)))


def release(vlm: nn.Module) -> None:
    """Reshard the units kept gathered through backward (before clipping and the optimizer step).

    A gradient still on a gathered parameter (one FSDP did not reduce) would be dropped by
    resharding: that stops the run instead. (A layer's first call on inputs that need no
    gradient, e.g. LoRA with frozen embeddings, is reduced: checked against one process.)
    """
    for unit in _units(vlm):
        if unit in _kept:
            params = cast(nn.Module, unit).parameters()
            if any(p.grad is not None and not _is_dtensor(p) for p in params):
                raise RuntimeError(f"FSDP left a gradient of {type(unit).__name__} unreduced")
            unit.reshard()


def clip_grad_norm_(accelerator: Any, model: nn.Module, max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` over the model's parameters; the norm of all shards together."""
    if is_sharded(model):
        release(model)
    return full_value(accelerator.clip_grad_norm_(model.parameters(), max_norm))


def _units(vlm: nn.Module) -> list[FSDPModule]:
    """The FSDP units in `vlm` (itself included)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in vlm.modules() if isinstance(m, FSDPModule)]


def _is_dtensor(x: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


@contextmanager
def gathered(vlm: nn.Module) -> Iterator[None]:
    """The whole model gathered on every process for the duration (a no-op when unsharded).

    For generation: processes decode answers of different lengths, so each would call the
    layers a different number of times; gathered once, the layers run with no collective.
    """
    if not is_sharded(vlm):
        yield
        return
    units = _units(vlm)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not vlm and m not in _kept, recurse=False)


def full_value(x: Any) -> Any:
    """A DTensor's whole value (e.g. a gradient norm summed over the shards); anything else as is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def plain_copy(vlm: nn.Module, main: bool) -> Any:
    """The trained model as an ordinary `LatentVLM` on the main process (None elsewhere).

    Every process must call this: the full weights are gathered to the main process.
    """
    if not is_sharded(vlm):
        return vlm
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        vlm, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not main:
        return None
    copy = _plain_builders[vlm]()
    copy.load_state_dict(full)
    return copy


# ---------------------------------------------------------------------------- checkpoints


class ShardedState:
    """The trained parameters of `vlm` and the optimizer's state, saved and loaded shard by shard.

    Keys: `model/<parameter name>` and `optim/<index>/<state>` (the index as in
    `optimizer.state_dict()`, over all parameter groups, so trained modules outside `vlm`,
    e.g. an auxiliary probe, keep theirs). Frozen weights are not saved: a resumed run loads
    them from `model.path`, as it was started.
    """

    def __init__(self, vlm: nn.Module, optimizer: torch.optim.Optimizer):
        self.vlm = vlm
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper

    def _tensors(self) -> dict[str, torch.Tensor]:
        state = {
            f"model/{n}": p.detach() for n, p in self.vlm.named_parameters() if p.requires_grad
        }
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            for key, val in self.optimizer.state.get(p, {}).items():
                if torch.is_tensor(val):
                    state[f"optim/{i}/{key}"] = val
        return state

    def save(self, folder: Path) -> None:
        """Every process writes its shards into `folder` (a collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        with _one_process_quiet():
            dcp.save(
                self._tensors(),
                storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True),
            )

    def load(self, folder: Path) -> None:
        """Load `folder` into the model's parameters and the optimizer's state, in place, on any number of processes."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        _init_optimizer_state(self.optimizer)
        state = self._tensors()
        with _one_process_quiet():
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))


@contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Without a process group (one process) DCP warns that it saves or loads in one process: intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


@torch.no_grad()
def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's (lazily made) state, zeros, so the checkpoint can load into it:
    one step with zero gradients and learning rate 0 (also weight decay's product), as
    torch.distributed.checkpoint does for the same reason."""
    if optimizer.state:
        return
    saved = []
    for group in optimizer.param_groups:
        saved.append(group["lr"])
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr


__all__ = [
    "SHARDED_DIR",
    "ShardedState",
    "clip_grad_norm_",
    "configured",
    "full_value",
    "gathered",
    "is_sharded",
    "plain_copy",
    "prepare",
    "release",
    "shard",
    "state_of",
]
