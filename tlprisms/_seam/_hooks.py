"""Every TransformerLens hook name tlprisms reads, and what each prism needs, declared once.

A :class:`Site` is a kind of recorded value (the embedding, a layer's attention pattern, a
norm's scale ...); :func:`hook_name` spells it for one model and layer. :data:`PART_SITES`
declares which sites each prism reads; :func:`hook_names` (and so ``tlprisms.needed_hooks``)
is derived from it, and the provenance check's sites (:data:`PROVENANCE_SITES`) are always
included so that a cache recorded with ``needed_hooks`` can always be verified.
"""

import enum
import functools
from typing import Any, Optional

__all__ = [
    "Site",
    "PART_SITES",
    "PARTS",
    "PROVENANCE_SITES",
    "hook_name",
    "hook_names",
    "parse_block_hook",
    "block_hook_name",
    "HOOK_NAME_KEY",
    "transcoder_hooks",
]


class Site(enum.Enum):
    """A recorded value of a forward pass, independent of how TransformerLens names it."""

    TOKENS = "tokens"  # the token ids as the embedding received them (bridges only)
    EMBED = "embed"
    POS_EMBED = "pos_embed"
    RESID_PRE = "resid_pre"
    RESID_MID = "resid_mid"
    RESID_POST = "resid_post"
    FINAL_RESID = "final_resid"  # the stream ln_final reads: resid_post of the last layer
    ATTN_OUT = "attn_out"
    MLP_OUT = "mlp_out"
    PATTERN = "pattern"
    V = "v"
    MLP_PRE = "mlp_pre"
    MLP_PRE_LINEAR = "mlp_pre_linear"  # a gated MLP's "up" projection
    MLP_POST = "mlp_post"
    SOLU_MID = "solu_mid"  # SoLU's act(pre) before its inner LayerNorm
    FINAL_SCALE = "ln_final.scale"
    LN1_SCALE = "ln1.scale"
    LN2_SCALE = "ln2.scale"
    LN1_POST_SCALE = "ln1_post.scale"
    LN2_POST_SCALE = "ln2_post.scale"
    SOLU_SCALE = "mlp.ln.scale"
    ATTN_SCORES = "attn_scores"  # pre-softmax scores (after soft-cap and mask)
    ROT_COS = "rot_cos"  # a bridge's rotary tables, as its attention received them
    ROT_SIN = "rot_sin"
    LN2_NORMALIZED = "ln2.normalized"  # the MLP's input after ln2 (a transcoder's input)
    # the query and key norms' RMS scales (Gemma 3, Qwen3: per head; OLMo 2: over all heads)
    Q_NORM_SCALE = "attn.q_norm.scale"
    K_NORM_SCALE = "attn.k_norm.scale"
    # the queries and keys as projected (before any query/key norm and rotary)
    Q = "q"
    K = "k"


_GLOBAL = frozenset({Site.TOKENS, Site.EMBED, Site.POS_EMBED, Site.FINAL_RESID, Site.FINAL_SCALE})

_WRITES = frozenset(
    {
        Site.EMBED,
        Site.POS_EMBED,
        Site.ATTN_OUT,
        Site.MLP_OUT,
        Site.FINAL_RESID,
        Site.FINAL_SCALE,
        Site.LN1_POST_SCALE,
        Site.LN2_POST_SCALE,
    }
)

#: the sites each prism reads (``needed_hooks(model, parts)`` records their union)
PART_SITES: dict[str, frozenset] = {
    "residual": _WRITES,
    "heads": _WRITES | {Site.PATTERN, Site.V},
    "neurons": _WRITES | {Site.MLP_POST},
    "chains": _WRITES
    | {
        Site.PATTERN,
        Site.V,
        Site.MLP_POST,
        Site.RESID_PRE,
        Site.RESID_MID,
        Site.RESID_POST,
        Site.LN1_SCALE,
        Site.LN2_SCALE,
        Site.MLP_PRE,
        Site.MLP_PRE_LINEAR,
        Site.SOLU_MID,
        Site.SOLU_SCALE,
    },
}
#: dictionary features (SAEs, transcoders) read the residual streams and norm scales their
#: encoders and hops read: the chains' sites
PART_SITES["features"] = PART_SITES["chains"]
#: the QK prism reads both sides' writers (split into heads/neurons on request), ln1's scale,
#: the scores it explains, a bridge's rotary tables and the query/key norms' scales
PART_SITES["qk"] = PART_SITES["heads"] | {
    Site.Q_NORM_SCALE,
    Site.K_NORM_SCALE,
    Site.RESID_PRE,
    Site.MLP_POST,
    Site.LN1_SCALE,
    Site.ATTN_SCORES,
    Site.ROT_COS,
    Site.ROT_SIN,
    Site.Q,
    Site.K,
}
PARTS = tuple(PART_SITES)

#: what the check that a cache belongs to this model and these tokens reads (always recorded,
#: at layer 0; the embedding's write is also read off resid_pre[0] where a norm follows it)
PROVENANCE_SITES = frozenset({Site.TOKENS, Site.EMBED, Site.RESID_PRE, Site.LN1_SCALE, Site.V})


@functools.lru_cache(maxsize=4096)  # called for every cache read; a pure function
def hook_name(site: Site, layer: Optional[int], *, n_layers: int, is_bridge: bool) -> str:
    """The TransformerLens hook name of ``site`` (at ``layer`` for per-layer sites)."""
    if site is Site.EMBED:
        return "hook_embed"
    if site is Site.TOKENS:
        return "embed.hook_in"
    if site is Site.POS_EMBED:
        return "hook_pos_embed"
    if site is Site.FINAL_SCALE:
        return "ln_final.hook_scale"
    if site is Site.FINAL_RESID:
        return f"blocks.{n_layers - 1}.hook_resid_post"
    if layer is None:
        raise ValueError(f"site {site} needs a layer")
    b = f"blocks.{layer}"
    return {
        Site.RESID_PRE: f"{b}.hook_resid_pre",
        Site.RESID_MID: f"{b}.hook_resid_mid",
        Site.RESID_POST: f"{b}.hook_resid_post",
        Site.ATTN_OUT: f"{b}.hook_attn_out",
        Site.MLP_OUT: f"{b}.hook_mlp_out",
        Site.PATTERN: f"{b}.attn.hook_pattern",
        Site.V: f"{b}.attn.hook_v",
        Site.MLP_PRE: f"{b}.mlp.hook_pre",
        Site.MLP_PRE_LINEAR: f"{b}.mlp.hook_pre_linear",
        Site.MLP_POST: f"{b}.mlp.hook_post",
        Site.SOLU_MID: f"{b}.mlp.ln.hook_in" if is_bridge else f"{b}.mlp.hook_mid",
        Site.LN1_SCALE: f"{b}.ln1.hook_scale",
        Site.LN2_SCALE: f"{b}.ln2.hook_scale",
        Site.LN1_POST_SCALE: f"{b}.ln1_post.hook_scale",
        Site.LN2_POST_SCALE: f"{b}.ln2_post.hook_scale",
        Site.SOLU_SCALE: f"{b}.mlp.ln.hook_scale",
        Site.ATTN_SCORES: f"{b}.attn.hook_attn_scores",
        Site.ROT_COS: f"{b}.attn.hook_cos",
        Site.ROT_SIN: f"{b}.attn.hook_sin",
        Site.LN2_NORMALIZED: f"{b}.ln2.hook_normalized",
        Site.Q_NORM_SCALE: f"{b}.attn.q_norm.hook_scale",
        Site.K_NORM_SCALE: f"{b}.attn.k_norm.hook_scale",
        Site.Q: f"{b}.attn.hook_q",
        Site.K: f"{b}.attn.hook_k",
    }[site]


#: the hooks inside a block a dictionary may read or write, by their name after
#: ``blocks.{layer}.`` (SAELens, Gemma Scope and circuit-tracer spellings)
_DICTIONARY_HOOKS = {
    "hook_resid_pre": Site.RESID_PRE,
    "hook_resid_mid": Site.RESID_MID,
    "hook_mlp_in": Site.RESID_MID,
    "hook_resid_post": Site.RESID_POST,
    "hook_attn_out": Site.ATTN_OUT,
    "hook_mlp_out": Site.MLP_OUT,
    "mlp.hook_out": Site.MLP_OUT,
    "ln2.hook_normalized": Site.LN2_NORMALIZED,
    "mlp.hook_in": Site.LN2_NORMALIZED,
}
#: the hook names a dictionary may name, for messages
DICTIONARY_HOOKS = tuple(_DICTIONARY_HOOKS)
#: the config key under which SAELens (and the demo SAE's metadata) names a dictionary's hook
HOOK_NAME_KEY = "hook_name"


def parse_block_hook(name: str) -> Optional[tuple[Site, int]]:
    """``(site, layer)`` of a block hook a dictionary can sit at, or None.

    >>> parse_block_hook("blocks.3.hook_resid_pre")
    (<Site.RESID_PRE: 'resid_pre'>, 3)
    """
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit():
        return None
    site = _DICTIONARY_HOOKS.get(parts[2])
    return None if site is None else (site, int(parts[1]))


def transcoder_hooks(layer: int) -> tuple[str, str, str]:
    """A transcoder's output hook and its two possible input hooks at ``layer`` (messages)."""
    b = f"blocks.{layer}"
    return f"{b}.hook_mlp_out", f"{b}.ln2.hook_normalized", f"{b}.hook_resid_mid"


def block_hook_name(layer: int, suffix: str) -> str:
    """The full hook name of ``suffix`` (e.g. ``"hook_mlp_out"``) in block ``layer``."""
    return f"blocks.{layer}.{suffix}"


def hook_names(view: Any, parts: tuple) -> list[str]:
    """The hook names ``parts`` read on this model, plus layer 0's provenance sites."""
    wanted = frozenset().union(*(PART_SITES[part] for part in parts))
    names = []
    for site in Site:  # a stable order
        if site in _GLOBAL:
            layers: Any = [None] if site in wanted | PROVENANCE_SITES else []
        elif site in wanted:
            layers = range(view.n_layers)
        else:
            layers = [0] if site in PROVENANCE_SITES else []
        names += [view.hook(site, layer) for layer in layers if view.has_site(site, layer)]
    return names
