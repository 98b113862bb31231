"""The TransformerLens hook names (relative to a block) and the hook-point keys of the
dictionary formats that :mod:`tlprisms.dictionary` maps onto them: kept in the seam, like every
other TransformerLens name."""

#: a block's output, the residual stream after it
RESID_POST = "hook_resid_post"
#: the residual stream between attention and MLP
RESID_MID = "hook_resid_mid"
#: what the MLP reads (ln2 applied in full) and what it writes (after a post-MLP norm)
MLP_IN = "mlp.hook_in"
MLP_OUT = "hook_mlp_out"
#: a bridge's MLP output before its post-MLP norm (not what the stream receives)
MLP_OUT_BEFORE_NORM = "mlp.hook_out"
#: what attention writes (after a post-attention norm)
ATTN_OUT = "hook_attn_out"
#: the per-head attention output before W_O (``[batch, pos, head, d_head]``; a dictionary
#: there reads and writes it flattened over heads, ``[..., n_heads * d_head]``)
ATTN_Z = "attn.hook_z"
#: ln2's output as TransformerLens records it (before the norm's weight and bias)
LN2_NORMALIZED = "ln2.hook_normalized"
#: Gemma Scope 2's config keys: where a dictionary reads and writes (Hugging Face names)
GEMMA_SCOPE_2_IN = "hf_hook_point_in"
GEMMA_SCOPE_2_OUT = "hf_hook_point_out"
#: SAELens' config key of a dictionary's site
SAELENS_HOOK = "hook_name"
#: SAELens' config key of the one head an SAE on a head's z reads (None: every head)
SAELENS_HEAD = "hook_head_index"
#: SAELens' ``reshape_activations`` value that flattens z over heads (``hook_z`` SAEs)
SAELENS_Z_RESHAPE = "hook_z"
#: Gemma Scope 2's Hugging Face module outputs, relative to ``model.layers.L``, and the
#: block hooks that record the same values (``o_proj``'s input is ``hook_z`` flattened over
#: heads)
GEMMA_SCOPE_2_POINTS = {
    "output": RESID_POST,
    "pre_feedforward_layernorm.output": MLP_IN,
    "post_feedforward_layernorm.output": MLP_OUT,
    "post_attention_layernorm.output": ATTN_OUT,
    "self_attn.o_proj.input": ATTN_Z,
}
