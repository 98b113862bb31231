"""Loading models by name: the embedded demo model offline, hub models when online.

``load_model("demo")`` never touches the network. Any other name goes to TransformerLens:
``TransformerBridge.boot_transformers(name)`` + ``enable_compatibility_mode()`` on
TransformerLens 4, ``HookedTransformer.from_pretrained(name)`` on 3.x (unless ``bridge=True``).

>>> from tlprisms.hub import load_model
>>> load_model("demo").cfg.n_layers
2
"""

from typing import Any, Optional

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
    try:
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
    except PrismError:
        raise
    except Exception as err:
        text = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        short = text if len(text) <= 300 else text[:297] + "..."
        low = text.lower()
        if any(word in low for word in _NETWORK_WORDS):
            raise PrismError(
                f"load_model: could not download {name!r}: the Hugging Face hub is not "
                f"reachable ({short}). Connect to the internet, or pre-download the "
                "weights and set HF_HUB_OFFLINE=1, or use the embedded model: --model demo."
            ) from err
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
            raise PrismError(
                f"load_model: unknown model {name!r} ({short}). Use a name TransformerLens "
                "supports (e.g. 'gpt2', 'EleutherAI/pythia-70m', 'google/gemma-2b'), or the "
                "embedded model 'demo' (--model demo)."
            ) from err
        raise PrismError(f"load_model: could not load {name!r}: {short}") from err
