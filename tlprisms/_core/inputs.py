"""What a prism is built from, checked: the input to record, its tokens and its logits.

A :class:`~tlprisms.LogitPrism` is only as good as its provenance: the cache must come from
the model (checked by the seam's :meth:`CacheView.verify`), the tokens must be the ones the
cache was recorded with, and the logits must be the ones the same forward pass returned
(compared at the last position with the frozen readout of the cache). Every check here
names the argument and the fix.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from tlprisms._core.errors import ArgumentError, CacheError, NonFiniteError, TargetError
from tlprisms._core.policy import FLOAT64_LOGITS_RTOL, LOGITS_RTOL
from tlprisms._core.readout import Recorded, explain, final_readout
from tlprisms._seam import CacheView, ModelView, all_finite

__all__ = ["input_tokens", "check_tokens", "check_logits", "logits_precision", "str_tokens"]


def input_tokens(view: ModelView, input: Any, prepend_bos: Any, caller: str) -> Tensor:
    """The token ids ``[batch, pos]`` of ``input`` (text, a list of texts, or token ids)."""
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise ArgumentError(f"{caller}: prepend_bos={prepend_bos!r}; pass True, False or None.")
    if isinstance(input, str) or (
        isinstance(input, list) and input and all(isinstance(t, str) for t in input)
    ):
        if view.tokenizer() is None:
            raise ArgumentError(
                f"{caller}: the model has no tokenizer, so text cannot be "
                "tokenized; pass token ids [batch, pos] instead."
            )
        kw = {} if prepend_bos is None else {"prepend_bos": prepend_bos}
        tokens = view.tokenize(input, **kw)
    elif isinstance(input, Tensor):
        tokens = input[None] if input.ndim == 1 else input
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.ndim != 2:
            raise ArgumentError(
                f"{caller}: token input must be an integer tensor [batch, pos] "
                f"or [pos]; got dtype {input.dtype}, shape {tuple(input.shape)}."
            )
        bad = (tokens < 0) | (tokens >= view.d_vocab_in)
        if bool(bad.any()):
            raise TargetError(
                f"{caller}: token id {int(tokens[bad][0])} is outside the "
                f"vocabulary [0, {view.d_vocab_in})."
            )
    else:
        raise ArgumentError(
            f"{caller}: input={input!r:.60}; pass a string, a non-empty list of "
            "strings, or an integer tensor of token ids."
        )
    if tokens.shape[-1] == 0:
        raise ArgumentError(
            f"{caller}: the input has no tokens; pass at least one token "
            "(an empty string gives none without a BOS token)."
        )
    return tokens


def check_tokens(tokens: Any, cv: CacheView) -> Tensor:
    """``tokens`` as ``[batch, pos]`` on the cache's device, or a clear error."""
    caller = cv.caller
    if (
        not isinstance(tokens, Tensor)
        or tokens.dtype.is_floating_point
        or tokens.dtype == torch.bool
    ):
        what = f"a {tokens.dtype} tensor" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ArgumentError(
            f"{caller}: tokens must be an integer tensor [batch, pos] (what "
            f"model.to_tokens returns); got {what}."
        )
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if tuple(tokens.shape) != (cv.batch, cv.n_ctx):
        raise CacheError(
            f"{caller}: tokens has shape {tuple(tokens.shape)} but the cache was "
            f"recorded for inputs of shape ({cv.batch}, {cv.n_ctx}); pass the tokens "
            "the cache was recorded with."
        )
    bad = (tokens < 0) | (tokens >= cv.view.d_vocab_in)
    if bool(bad.any()):
        raise TargetError(
            f"{caller}: token id {int(tokens[bad][0])} is outside the "
            f"vocabulary [0, {cv.view.d_vocab_in})."
        )
    return tokens.to(cv.device)


def check_logits(logits: Any, cv: CacheView) -> Tensor:
    """``logits`` ``[batch, pos, d_vocab]`` for this cache and model, finite, detached."""
    view, caller = cv.view, cv.caller
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point or logits.ndim != 3:
        what = (
            f"shape {tuple(logits.shape)}, dtype {logits.dtype}"
            if isinstance(logits, Tensor)
            else type(logits).__name__
        )
        raise ArgumentError(
            f"{caller}: logits must be the float tensor [batch, pos, d_vocab] "
            f"that run_with_cache returned; got {what}."
        )
    if tuple(logits.shape[:2]) != (cv.batch, cv.n_ctx) or logits.shape[-1] != view.d_vocab:
        raise CacheError(
            f"{caller}: logits has shape {tuple(logits.shape)}, expected "
            f"({cv.batch}, {cv.n_ctx}, {view.d_vocab}) for this cache and model."
        )
    if not all_finite(logits):
        where = tuple(int(i) for i in torch.nonzero(~torch.isfinite(logits))[0])
        raise NonFiniteError(
            f"{caller}: the logits hold NaN or infinity (first at batch, "
            f"pos, token = {where}); the forward pass overflowed. Re-run it "
            "in float32, or pass logits=None."
        )
    return logits.detach()


def logits_precision(rec: Recorded, precision: str) -> str:
    """Check that ``rec``'s logits are its cache's (the top logit at the last position against
    the frozen readout of the cache) and return the precision the model computed in: a
    float64 model whose logits carry float32 rounding computed part of its forward pass in
    float32 (Hugging Face's RMSNorm upcasts to float32 only)."""
    assert rec.logits is not None
    cv = rec.cache
    ids = rec.logits[:, -1].argmax(-1)
    fr = final_readout(Recorded(cv.for_call("LogitPrism")), ids, -1)
    ex = explain(Recorded(cv), fr, "post")
    want = ex.values[:, 0, 0]
    got = rec.logits[:, -1].gather(-1, ids[:, None]).to(want.device, cv.dtype)[:, 0]
    rel = float(((got - want).abs() / (1.0 + want.abs())).max())
    if precision == "float64" and rel > FLOAT64_LOGITS_RTOL:
        precision = "float32"
    if not rel <= LOGITS_RTOL[cv.low_precision]:
        raise CacheError(
            "LogitPrism: the logits passed do not belong to this cache: the top logit at the "
            f"last position is {float(got[0]):.6g} but the cache's final residual stream gives "
            f"{float(want[0]):.6g}. Pass the logits and cache of the same "
            "model.run_with_cache call."
        )
    return precision


def str_tokens(view: ModelView, tokens: Optional[Tensor]) -> Optional[list]:
    """The input tokens as strings, per batch row (None without tokens or a tokenizer)."""
    if tokens is None or view.tokenizer() is None:
        return None
    return [[view.token_label(int(t), quote=False) for t in row] for row in tokens.cpu()]
