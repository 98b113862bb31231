"""The seam: the only package that knows TransformerLens.

Model classes (``HookedTransformer``, ``TransformerBridge`` in compatibility mode), hook names,
weight layouts, bias accessors, normalisation conventions and TransformerLens's quirks live
here and nowhere else. Prisms see a model through :class:`ModelView` and a cache through
:class:`CacheView`, which they read by :class:`Site`; what each prism reads is declared once
in :data:`PART_SITES`, and :func:`needed_hooks` is derived from it.
"""

from collections.abc import Callable, Sequence
from typing import Any

from tlprisms._core.arguments import entry
from tlprisms._core.errors import ArgumentError
from tlprisms._seam._cache import LOW_PRECISION, CacheView, all_finite
from tlprisms._seam._hooks import (
    DICTIONARY_HOOKS,
    HOOK_NAME_KEY,
    PART_SITES,
    PARTS,
    PROVENANCE_SITES,
    Site,
    block_hook_name,
    hook_names,
    parse_block_hook,
    transcoder_hooks,
)
from tlprisms._seam._interventions import (
    COPY_TOKENS,
    Ablation,
    Copy,
    Removal,
    Through,
    record,
    run_ablated,
    run_frozen,
)
from tlprisms._seam._model import ModelView, architecture_name
from tlprisms._seam._norms import NormSpec

__all__ = [
    "all_finite",
    "ModelView",
    "CacheView",
    "NormSpec",
    "Site",
    "PART_SITES",
    "PARTS",
    "PROVENANCE_SITES",
    "LOW_PRECISION",
    "needed_hooks",
    "architecture_name",
    "Removal",
    "Through",
    "Copy",
    "Ablation",
    "run_frozen",
    "run_ablated",
    "record",
    "COPY_TOKENS",
    "DICTIONARY_HOOKS",
    "parse_block_hook",
    "block_hook_name",
    "HOOK_NAME_KEY",
    "transcoder_hooks",
]


@entry
def needed_hooks(model: Any, parts: Sequence[str] = PARTS) -> Callable[[str], bool]:
    """A ``names_filter`` for ``model.run_with_cache`` that keeps what the prisms need.

    It keeps what ``parts`` read, plus what the check that the cache belongs to this model
    reads (always), and nothing else; its ``.names`` lists them.

    >>> import tlprisms as tp
    >>> from tlprisms.demo import load_demo_model
    >>> model = load_demo_model()
    >>> keep = tp.needed_hooks(model, ("residual",))
    >>> keep("hook_embed"), keep("blocks.0.attn.hook_pattern")
    (True, False)

    Args:
        model: the TransformerLens model.
        parts: which prisms the cache must serve: any of ``"residual"``, ``"heads"``,
            ``"neurons"``, ``"chains"`` (default: all of them).
    """
    if isinstance(parts, str) or not all(isinstance(p, str) and p in PART_SITES for p in parts):
        raise ArgumentError(
            f"needed_hooks: parts={parts!r}; pass a tuple of any of {', '.join(map(repr, PARTS))}"
            ", e.g. needed_hooks(model, ('residual', 'heads'))."
        )
    names = frozenset(hook_names(ModelView(model), tuple(parts)))

    def names_filter(name: str) -> bool:
        return name in names

    names_filter.names = sorted(names)  # type: ignore[attr-defined]
    return names_filter
