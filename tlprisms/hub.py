"""Loading models by name: the embedded demo model offline, hub models when online.

``load_model("demo")`` never touches the network. Any other name goes to TransformerLens:
``TransformerBridge.boot_transformers(name)`` + ``enable_compatibility_mode()`` on
TransformerLens 4, ``HookedTransformer.from_pretrained(name)`` on 3.x (unless ``bridge=True``).

>>> from tlprisms.hub import load_model
>>> load_model("demo").cfg.n_layers
2
"""

import difflib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Optional
from urllib.parse import urlparse

import torch

from tlprisms._core.errors import PrismError

__all__ = ["load_model"]

_NETWORK_WORDS = (
    "connect",
    "network",
    "offline",
    "resolve",
    "timed out",
    "temporary failure",
    "max retries",
    "connection",
    "outgoing traffic has been disabled",
)


#: seconds to wait for the hub before calling it unreachable (instead of minutes of retries)
HUB_PROBE_TIMEOUT = 3.0
_TRUE = ("1", "on", "yes", "true")


def _names_module() -> Any:
    """TransformerLens's table of official model names and aliases: ``supported_models``
    on 4.x, ``loading_from_pretrained`` on 3.x (where ``supported_models`` exists without
    the lookup)."""
    import importlib

    for name in ("transformer_lens.supported_models", "transformer_lens.loading_from_pretrained"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "get_official_model_name"):
            return mod
    raise ImportError("TransformerLens has no table of official model names")


def _official(name: str) -> Optional[str]:
    """The official TransformerLens name of ``name`` (a name or an alias), or None."""
    try:
        return str(_names_module().get_official_model_name(name))
    except Exception:  # noqa: BLE001 - not a name TransformerLens knows
        return None


def _close_names(name: str) -> list[str]:
    try:
        mod = _names_module()
    except ImportError:
        return []
    names = list(getattr(mod, "OFFICIAL_MODEL_NAMES", []))
    for aliases in getattr(mod, "MODEL_ALIASES", {}).values():
        names += list(aliases)
    return difflib.get_close_matches(name, names, n=3, cutoff=0.75)


def _offline_reason() -> Optional[str]:
    """Why the hub cannot be reached (None when it can): offline mode, or no connection to
    its host within :data:`HUB_PROBE_TIMEOUT` seconds."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}=1"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or 443
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as err:
        return f"no connection to {host}: {err}"
    return None


def _cached(*names: str) -> bool:
    """Whether a model's configuration is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return False
    return any(isinstance(try_to_load_from_cache(n, "config.json"), str) for n in names)


@contextmanager
def _offline_mode() -> Iterator[None]:
    """Load from the local cache only (no retries against an unreachable hub)."""
    old = {v: os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for var, value in old.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _check_reachable(name: str) -> bool:
    """Fail fast when ``name`` cannot be loaded because the hub is unreachable, telling an
    unknown name from a known one; True when it must be loaded from the local cache."""
    reason = _offline_reason()
    if reason is None:
        return False
    official = _official(name)
    if _cached(name, *([official] if official else [])):
        return True
    if official is None:
        close = _close_names(name)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise PrismError(
            f"load_model: unknown model {name!r}: it is not a model name TransformerLens "
            f"knows{hint} nor in the local Hugging Face cache, and the hub is not reachable "
            f"({reason}) to look it up. Check the spelling, connect to the internet, or use "
            "the embedded model: --model demo."
        )
    raise PrismError(
        f"load_model: could not download {name!r}: the Hugging Face hub is not reachable "
        f"({reason}) and its weights are not in the local cache. Connect to the internet, "
        "or pre-download the weights, or use the embedded model: --model demo."
    )


def _has_hooked() -> bool:
    try:
        import transformer_lens

        return hasattr(transformer_lens, "HookedTransformer")
    except ImportError:
        return False


def load_model(
    name: str,
    *,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    fold: bool = True,
    bridge: Optional[bool] = None,
) -> Any:
    """A TransformerLens model ready for :class:`~tlprisms.LogitPrism`.

    Args:
        name: ``"demo"`` for the embedded model, or a model TransformerLens can load
            (``"gpt2"``, ``"google/gemma-2b"``, ...).
        fold: fold norm weights into the next linear maps (TransformerLens's default).
        bridge: use ``TransformerBridge`` (default on TransformerLens 4, where it is the only
            class) rather than ``HookedTransformer``.

    Raises:
        PrismError: the name is unknown, or the hub cannot be reached (with what to do).
    """
    if name == "demo":
        from tlprisms.demo import load_demo_model

        return load_demo_model(fold=fold, device=device, dtype=dtype or torch.float32)
    use_bridge = (not _has_hooked()) if bridge is None else bridge
    local = _check_reachable(name)  # seconds, not minutes of retries, when offline
    try:
        with _offline_mode() if local else nullcontext():
            return _load(name, use_bridge, device, dtype, fold)
    except PrismError:
        raise
    except Exception as err:
        raise _explained(name, err) from err


def _load(
    name: str, use_bridge: bool, device: str, dtype: Optional[torch.dtype], fold: bool
) -> Any:
    if use_bridge:
        from transformer_lens.model_bridge import TransformerBridge

        kw: dict[str, Any] = {"device": device}
        if dtype is not None:
            kw["dtype"] = dtype
        model = TransformerBridge.boot_transformers(name, **kw)
        model.enable_compatibility_mode(disable_warnings=True, no_processing=not fold)
        return model
    from transformer_lens import HookedTransformer

    loader = (
        HookedTransformer.from_pretrained
        if fold
        else HookedTransformer.from_pretrained_no_processing
    )
    kw = {"device": device}
    if dtype is not None:
        kw["dtype"] = dtype
    return loader(name, **kw)


def _explained(name: str, err: Exception) -> PrismError:
    """A loading error as one line that says what to do."""
    text = " ".join(f"{type(err).__name__}: {err}".split())  # one line
    short = text if len(text) <= 300 else text[:297] + "..."
    low = text.lower()
    if any(word in low for word in _NETWORK_WORDS):
        return PrismError(
            f"load_model: could not download {name!r}: the Hugging Face hub is not "
            f"reachable ({short}). Connect to the internet, or pre-download the "
            "weights and set HF_HUB_OFFLINE=1, or use the embedded model: --model demo."
        )
    if any(
        w in low
        for w in (
            "not found",
            "not a valid model",
            "valid official model",
            "does not appear",
            "unrecognized",
            "repository",
        )
    ):
        return PrismError(
            f"load_model: unknown model {name!r} ({short}). Use a name TransformerLens "
            "supports (e.g. 'gpt2', 'EleutherAI/pythia-70m', 'google/gemma-2b'), or the "
            "embedded model 'demo' (--model demo)."
        )
    return PrismError(f"load_model: could not load {name!r}: {short}")
