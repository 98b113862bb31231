"""Train the demo SAE shipped in ``tlprisms/demo/assets/demo_sae.safetensors``.

A ReLU sparse autoencoder with 256 features on the embedded demo model's residual stream
before layer 1 (``blocks.1.hook_resid_pre``), trained on every position of the capital and
addition prompts (plus their variants without the answer), seeded and deterministic on CPU,
in a few seconds:

    loss = mean over positions of |x - x_hat|^2 / |x|^2 + L1_COEF * sum_f a_f |W_dec[f]| / |x|

Decoder rows are kept at unit norm. Usage: ``python scripts/train_demo_sae.py [--out PATH]``.
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tlprisms.demo import ASSETS_DIR, addition_task, capital_task, load_demo_model

SEED = 0
D_SAE = 256
STEPS = 1500
LR = 3e-3
L1_COEF = 2e-2
LAYER = 1


def activations() -> torch.Tensor:
    model = load_demo_model()
    prompts = [p for p, _ in capital_task()] + [p for p, _ in addition_task()]
    prompts += [p + a for p, a in capital_task()] + [p + a for p, a in addition_task()]
    name = f"blocks.{LAYER}.hook_resid_pre"
    rows = []
    with torch.no_grad():
        for p in prompts:
            _, cache = model.run_with_cache(model.to_tokens(p), names_filter=lambda n: n == name)
            rows.append(cache[name][0, 1:])  # the BOS position is an outlier; leave it out
    return torch.cat(rows).float()


def train(x: torch.Tensor) -> dict:
    torch.manual_seed(SEED)
    d = x.shape[1]
    scale = x.norm(dim=-1).mean()
    norms2 = (x**2).sum(-1)
    W_dec = torch.randn(D_SAE, d)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    params = {
        "W_enc": torch.nn.Parameter(W_dec.T.clone() / scale),
        "b_enc": torch.nn.Parameter(torch.zeros(D_SAE)),
        "W_dec": torch.nn.Parameter(W_dec.clone()),
        "b_dec": torch.nn.Parameter(x.mean(0).clone()),
    }
    opt = torch.optim.Adam(params.values(), lr=LR)
    for _ in range(STEPS):
        a = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        x_hat = a @ params["W_dec"] + params["b_dec"]
        mse = (((x - x_hat) ** 2).sum(-1) / norms2).mean()  # every position counts
        l1 = ((a * params["W_dec"].norm(dim=-1)).sum(-1) / norms2.sqrt()).mean()
        loss = mse + L1_COEF * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=-1, keepdim=True)
    with torch.no_grad():
        a = torch.relu((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        x_hat = a @ params["W_dec"] + params["b_dec"]
        rel = ((x - x_hat).norm(dim=-1) / x.norm(dim=-1)).max()
        l0 = float((a > 0).float().sum(-1).mean())
    print(f"largest relative reconstruction error {float(rel):.3f}, mean L0 {l0:.1f}")
    return {k: v.detach().contiguous() for k, v in params.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ASSETS_DIR / "demo_sae.safetensors")
    args = ap.parse_args()
    weights = train(activations())
    meta = {
        "hook_name": f"blocks.{LAYER}.hook_resid_pre",
        "architecture": "standard",
        "apply_b_dec_to_input": "true",
        "seed": str(SEED),
    }
    save_file(weights, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB): {json.dumps(meta)}")


if __name__ == "__main__":
    main()
