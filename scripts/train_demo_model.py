#!/usr/bin/env python
"""Train the embedded tlprisms demo model and write tlprisms/demo/assets/.

A miniature of gemma-2b's architecture (HF ``GemmaForCausalLM`` built from a
local ``GemmaConfig``: RMSNorm, gated GELU-tanh MLP, rotary positions,
multi-query attention, tied embeddings scaled by sqrt(d_model)), trained from a
fixed seed on CPU on two tasks:

* "The capital of France is" -> " Paris" (the countries of tlprisms.demo.CAPITALS)
* "7+2=" -> " 9" for a, b in 1..9

The training sequences are the prompts followed by their answer token, each
with BOS first (as TransformerLens' ``to_tokens`` encodes them). The loss is
next-token cross-entropy at every position, with the answer position weighted
up; the other positions keep the residual stream at the prompt tokens doing
ordinary language modelling instead of being left untrained.

Writes model.safetensors, config.json, tokenizer.json and metadata.json, and
prints the accuracy per task and the time taken.

    python scripts/train_demo_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tlprisms.demo import (  # noqa: E402
    DEMO_CONFIG,
    SPECIAL_TOKENS,
    addition_task,
    capital_task,
)

SEED = 0
ANSWER_WEIGHT = 4.0


def build_tokenizer():
    """Word-level tokenizer: whitespace and every punctuation char split, digit runs kept."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "eos_token", "bos_token", "unk_token")]
    words: list[str] = []

    def add(w: str) -> None:
        if w not in words:
            words.append(w)

    for w in ["The", "capital", "of", "is", "+", "="]:
        add(w)
    for prompt, answer in capital_task():
        add(prompt.split()[3])
        add(answer.strip())
    for n in range(0, 19):
        add(str(n))
    vocab = {tok: i for i, tok in enumerate(specials + words)}

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    bos = SPECIAL_TOKENS["bos_token"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        model_max_length=DEMO_CONFIG["max_position_embeddings"],
        padding_side="right",
        **SPECIAL_TOKENS,
    )
    return tk, tok


def encode_examples(tok, examples):
    """(ids, answer_pos, answer_id) per example; asserts single-token answers and words."""
    out = []
    for prompt, answer in examples:
        p_ids = tok(prompt)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        assert p_ids[0] == tok.bos_token_id, prompt
        assert tok.unk_token_id not in p_ids, prompt
        assert len(a_ids) == 1 and a_ids[0] != tok.unk_token_id, answer
        out.append((p_ids + a_ids, len(p_ids) - 1, a_ids[0]))
    return out


def make_batch(encoded, pad_id):
    T = max(len(ids) for ids, _, _ in encoded)
    B = len(encoded)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    weights = torch.zeros(B, T)
    last = torch.zeros(B, dtype=torch.long)
    answers = torch.zeros(B, dtype=torch.long)
    for i, (ids, pos, ans) in enumerate(encoded):
        n = len(ids)
        inputs[i, :n] = torch.tensor(ids)
        targets[i, : n - 1] = torch.tensor(ids[1:])
        weights[i, : n - 1] = 1.0
        weights[i, pos] = ANSWER_WEIGHT
        last[i], answers[i] = pos, ans
    return inputs, targets, weights, last, answers


@torch.no_grad()
def accuracy(model, inputs, last, answers):
    """Greedy accuracy at the answer position, and each correct answer's logit margin."""
    logits = model(input_ids=inputs).logits
    ans_logits = logits[torch.arange(len(last)), last]
    correct = ans_logits.argmax(-1) == answers
    runner_up = ans_logits.scatter(1, answers[:, None], float("-inf")).max(-1).values
    margin = ans_logits.gather(1, answers[:, None])[:, 0] - runner_up
    return correct.float().mean().item(), margin


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "tlprisms" / "demo" / "assets")
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    from safetensors.torch import save_file
    from transformers import GemmaConfig, GemmaForCausalLM

    tk, tok = build_tokenizer()
    cap = encode_examples(tok, capital_task())
    add = encode_examples(tok, addition_task())

    cfg = GemmaConfig(vocab_size=len(tok), **DEMO_CONFIG)
    cfg._attn_implementation = "eager"
    model = GemmaForCausalLM(cfg)
    # Start the RMSNorm gains (1 + w) spread over [0.5, 2] instead of all 1, so
    # that the trained norms are far from the identity and folding them into
    # the next layer (TransformerLens' fold_ln) is a visible, testable change.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 1.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, params {n_params:,} ({n_params * 4 / 1e6:.2f} MB float32)")

    inputs, targets, weights, last, answers = make_batch(cap + add, tok.pad_token_id)
    n_cap = len(cap)

    # No weight decay on the RMSNorm weights (Gemma stores w and scales by 1 + w),
    # as usual for norm gains; everything else decays.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    warmup = 100

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    for step in range(args.steps):
        logits = model(input_ids=inputs).logits
        loss_tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).reshape(targets.shape)
        loss = (loss_tok * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            ans_loss = loss_tok[torch.arange(len(last)), last]
            print(
                f"step {step:5d}  loss {loss.item():.4f}  "
                f"answer loss capital {ans_loss[:n_cap].mean().item():.4f} "
                f"addition {ans_loss[n_cap:].mean().item():.4f}  ({time.time() - t0:.0f}s)"
            )
    model.eval()

    acc_cap, m_cap = accuracy(model, inputs[:n_cap], last[:n_cap], answers[:n_cap])
    acc_add, m_add = accuracy(model, inputs[n_cap:], last[n_cap:], answers[n_cap:])
    elapsed = time.time() - t0
    print(f"capital accuracy  {acc_cap:.4f} ({n_cap} prompts), min logit margin {m_cap.min():.2f}")
    print(
        f"addition accuracy {acc_add:.4f} ({len(add)} prompts), min logit margin {m_add.min():.2f}"
    )
    print(f"training time {elapsed:.1f}s")
    if acc_cap < 0.99 or acc_add < 0.99:
        raise SystemExit("accuracy below 99%: assets not written")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }  # tied to model.embed_tokens.weight
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg_dict = dict(DEMO_CONFIG)
    cfg_dict["vocab_size"] = len(tok)
    cfg_dict["model_type"] = "gemma"
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    tk.save(str(out / "tokenizer.json"))
    import tokenizers
    import transformers

    meta = {
        "description": "tlprisms demo model: a miniature gemma-2b-architecture GemmaForCausalLM "
        "trained on country capitals and single-digit addition",
        "seed": SEED,
        "steps": args.steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "answer_weight": ANSWER_WEIGHT,
        "n_params": n_params,
        "vocab_size": len(tok),
        "accuracy": {"capital": acc_cap, "addition": acc_add},
        "min_logit_margin": {
            "capital": round(m_cap.min().item(), 4),
            "addition": round(m_add.min().item(), 4),
        },
        "n_prompts": {"capital": n_cap, "addition": len(add)},
        "training_seconds": round(elapsed, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
    }
    with open(out / "metadata.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")


if __name__ == "__main__":
    main()
