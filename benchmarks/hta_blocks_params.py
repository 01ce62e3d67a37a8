"""Trainable adapter parameters on ViT-B/16 (timm ``vit_base_patch16_224``, ``pretrained=False``) for HTA's block
layouts and LoRA; adapter tensors only (the head is not counted). Writes ``benchmarks/results/hta_blocks_params.json``.

    python benchmarks/hta_blocks_params.py

The paper's count (one Householder-SVD block per projection on W_q, W_k, W_v, W_o, lora_rank 1) is
12 blocks x 4 maps x 5 x 768 = 184,320 (u_in, u_out, d, A (1 x 768), B (768 x 1) per map).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hh_peft  # noqa: E402,F401
from hh_peft import HouseholderConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "hta_blocks_params.json"

QKVO = ["qkv", "attn.proj"]
FFN = ["fc1", "fc2"]
CASES = {
    "HTA q,k,v,o per-projection (paper; fused qkv in 3 blocks)": HouseholderConfig(target_modules=QKVO),
    "HTA q,k,v,o fused (output_blocks=1, the layout before blocks)": HouseholderConfig(target_modules=QKVO, output_blocks=1),
    "HTA q,v per-projection (adapted_blocks qkv [0, 2])": HouseholderConfig(target_modules=["qkv"], adapted_blocks={"qkv": [0, 2]}),
    "HTA q,k,v,o + FFN, rectangular='diagonal' (default)": HouseholderConfig(target_modules=QKVO + FFN),
    "HTA q,k,v,o + FFN, rectangular='square_blocks'": HouseholderConfig(target_modules=QKVO + FFN, rectangular="square_blocks"),
    "HTA q,k,v,o per-projection, lora_rank=0": HouseholderConfig(target_modules=QKVO, lora_rank=0),
    "LoRA r=8 on qkv (= q,v with r=8 each: 8 x (768 + 2304) = 2 x 8 x (768 + 768))": LoraConfig(r=8, target_modules=["qkv"]),
    "LoRA r=8 q,k,v,o (qkv + proj)": LoraConfig(r=8, target_modules=QKVO),
    "LoRA r=1 q,k,v,o (qkv + proj)": LoraConfig(r=1, target_modules=QKVO),
}


def adapter_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ("hta_" in n or "lora_" in n))


def main() -> None:
    rows = {}
    for name, config in CASES.items():
        torch.manual_seed(0)
        base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
        model = get_peft_model(base, config)
        rows[name] = adapter_parameters(model)
        print(f"{rows[name]:>10,}  {name}")
    paper = rows["HTA q,k,v,o per-projection (paper; fused qkv in 3 blocks)"]
    assert paper == 12 * 4 * 5 * 768 == 184_320, paper
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": "timm vit_base_patch16_224", "adapter_parameters": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
