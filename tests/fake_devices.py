"""A model split across two devices, simulated on the CPU, for the split-model tests.

No second accelerator is needed: a wrapper tensor (:class:`Far`) holds ordinary CPU data but
says it lives on another device: ``lazy``, a device type that every PyTorch build can name and
guard without its backend (``meta`` would do too, but TransformerLens refuses to read weights
on ``meta``; ``cuda`` needs CUDA even to index a tensor). A dispatch mode (:class:`TwoDevices`)
runs every operation on the data underneath and enforces what a real pair of devices
enforces: an operation that mixes a far tensor with a tensor of more than one element on the
CPU fails ("Expected all tensors to be on the same device", as CUDA says; indexing with CPU
index tensors and 0-dim CPU scalars are allowed, as on CUDA), and a tensor crosses only by an
explicit ``.to(...)`` or ``copy_``.
Every crossing is recorded (:attr:`TwoDevices.moves`), with whether its source shares storage
with a tensor the harness put on the far device (a cached activation or a weight of a far
layer): moving one of those whole is what a split model must never do.

:func:`split_model` puts the layers from ``cut`` on, the final norm and the unembedding of a
model (its parameters) and of its cache (its hooks) on the far device, as a HookedTransformer
with ``n_devices=2`` or a bridge loaded with a ``device_map`` would.
"""

import copy
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FAR = torch.device("lazy")
HOME = torch.device("cpu")
aten = torch.ops.aten
#: operations whose CPU index tensors may index a far tensor (as CUDA allows)
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_COPIES = {aten.copy_.default}
#: a view of a far input that crosses is "whole" when it holds more than this fraction of
#: it: one position of a residual stream (``x[:, -1:]``) may cross, a head's values may not
VIEW_SHARE = 6
#: vectors may cross (a norm's weight, a bias, one scale per position: at most this many
#: elements in the family models, whose activations and matrices hold 600 and more)
SMALL = 64


class Far(torch.Tensor):
    """CPU data that says it lives on the far device."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> "Far":
        assert not isinstance(inner, Far) and inner.device == HOME
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=FAR,
            requires_grad=False,
        )
        out.inner = inner
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Far({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _STATE.run(func, args, kwargs or {})


@dataclass
class Move:
    """One crossing between the devices."""

    op: str
    src: torch.device
    dst: torch.device
    numel: int
    #: the source is a cached activation or weight of a far layer, or a view of more than
    #: ``1 / VIEW_SHARE`` of one, and more than a vector (:data:`SMALL`)
    whole_input: bool
    #: the tlprisms lines that made it (``file:line < caller:line ...``), or ""
    where: str = ""


@dataclass
class _State:
    moves: list = field(default_factory=list)
    #: storage pointer -> (elements, the tensor) of each tensor put on the far device (held,
    #: so that its memory is never reused by another tensor while the harness looks it up)
    far_storages: dict = field(default_factory=dict)

    def _record(self, op: str, src: Any, dst: torch.device) -> None:
        if not isinstance(src, torch.Tensor):
            return
        base = src.inner if isinstance(src, Far) else src
        of = self.far_storages.get(base.untyped_storage().data_ptr(), (None,))[0]
        whole = of is not None and src.numel() * VIEW_SHARE > of and src.numel() > SMALL
        self.moves.append(Move(op, src.device, dst, src.numel(), whole, _caller()))

    def run(self, func, args, kwargs):
        devices: set = set()

        def unwrap(x: Any) -> Any:
            if isinstance(x, Far):
                devices.add(FAR)
                return x.inner
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                devices.add(x.device)
            return x

        a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        target = kwargs.get("device")
        target = None if target is None else torch.device(target)
        if func is aten._to_copy.default and target is not None:
            if target != args[0].device:
                self._record("to", args[0], target)
            k["device"] = HOME
            out = func(*a, **k)
            return Far(out) if target == FAR else out
        if target == FAR:  # a factory (zeros, empty, arange, full, ...) on the far device
            k["device"] = HOME
            return _wrap(func(*a, **k))
        if func in _COPIES:
            dst, src = args[0], args[1]
            if isinstance(src, torch.Tensor) and src.device != dst.device and src.dim() > 0:
                self._record("copy_", src, dst.device)
            func(*a, **k)
            return dst
        if func in _INDEXING and isinstance(args[0], Far):
            devices = {FAR}
        if len(devices) > 1:
            raise RuntimeError(
                "Expected all tensors to be on the same device, but found at least two "
                f"devices, {sorted(map(str, devices))}! (in {func})"
            )
        out = func(*a, **k)
        return _wrap(out) if FAR in devices else out


def _caller() -> str:
    """The innermost tlprisms lines on the stack, innermost first (``file:line < ...``)."""
    ours = [f for f in traceback.extract_stack() if "/tlprisms/" in f.filename]
    return " < ".join(f"{f.filename.split('/tlprisms/')[-1]}:{f.lineno}" for f in ours[::-1][:3])


def _wrap(out: Any) -> Any:
    return tree_map(lambda o: Far(o) if isinstance(o, torch.Tensor) else o, out)


_STATE = _State()


class TwoDevices(TorchDispatchMode):
    """Run the code inside on the simulated pair of devices; :attr:`moves` lists every
    crossing made while it ran."""

    def __enter__(self) -> "TwoDevices":
        _STATE.moves = []
        return super().__enter__()

    @property
    def moves(self) -> list:
        return list(_STATE.moves)

    def whole_inputs_moved(self) -> list:
        """Crossings of a far layer's cached activation or weight (or of a large view of
        one)."""
        return [m for m in _STATE.moves if m.whole_input]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _STATE.run(func, args, kwargs or {})


def to_far(t: torch.Tensor) -> Far:
    """``t`` (on the CPU) as a far tensor; its storage counts as a far input."""
    out = Far(t.detach())
    _STATE.far_storages[t.untyped_storage().data_ptr()] = (t.numel(), t)
    return out


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def is_far(name: str, cut: int) -> bool:
    """Whether the hook or parameter ``name`` lives on the far device: layers ``>= cut``,
    the final norm and the unembedding (and the logits they make)."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)) >= cut
    return name.startswith(("ln_final", "unembed", "lm_head", "model.norm", "norm"))


def split_model(model: Any, cut: int) -> Any:
    """A copy of ``model`` whose layers ``>= cut``, final norm and unembedding hold their
    parameters on the far device."""
    far = copy.deepcopy(model)
    modules = [far.blocks[i] for i in range(cut, len(far.blocks))]
    for name in ("ln_final", "unembed"):
        if hasattr(far, name):
            modules.append(getattr(far, name))
    for m in modules:
        m._apply(lambda t: to_far(t) if not isinstance(t, Far) else t)
    return far


def split_cache(cache: Any, cut: int) -> dict:
    """The cache's tensors as a dict, those of far hooks on the far device."""
    return {
        name: to_far(t) if is_far(name, cut) else t
        for name, t in dict(cache.items() if hasattr(cache, "items") else cache).items()
    }


def home(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` as a plain CPU tensor."""
    if isinstance(t, Far):
        return t.inner
    return t
