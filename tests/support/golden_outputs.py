"""Golden outputs: a small fixed dual encoder on fixed inputs, its embeddings and every loss on
them, kept in ``tests/data/golden_outputs.json``; ``tests/unit/losses/test_golden_outputs.py``
fails when any of them drifts by more than 1e-6.

The weights and inputs come from numpy's PCG64 generator (stable across numpy and torch
releases), not from torch's initialisers, so only a change of what the code computes moves
them. Everything runs in float64 on the CPU.

Regenerate only for an intended change of the model's or a loss's numbers, and say why in the
commit:

    python tests/support/golden_outputs.py --write
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_outputs.json"
ROWS, VOCAB, TOKENS = 8, 50, 10


def fixed_model():
    from vcl_dist.config import ModelConfig
    from vcl_dist.models import build_dual_encoder

    model = build_dual_encoder(ModelConfig(embed_dim=8, image={"width": 4}, text={
        "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "num_layers": 1}), VOCAB, TOKENS).double().eval()
    rng = np.random.Generator(np.random.PCG64(2026))
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if tensor.is_floating_point():
                values = rng.standard_normal(tuple(tensor.shape)) * 0.2
                if name.endswith("running_var"):
                    values = 1.0 + np.abs(values)
                tensor.copy_(torch.from_numpy(values))
    return model


def fixed_inputs() -> dict:
    rng = np.random.Generator(np.random.PCG64(7))
    return {
        "image": torch.from_numpy(rng.integers(0, 256, (ROWS, 3, 16, 16), dtype=np.uint8)),
        "input_ids": torch.from_numpy(rng.integers(5, VOCAB, (ROWS, TOKENS))),
        "attention_mask": torch.ones(ROWS, TOKENS, dtype=torch.long),
        "label": torch.tensor([0, 1, 2, 0, -1, 1, 2, -1]),
        "group": torch.tensor([0, 1, 2, 2, 4, 5, 6, 7]),  # rows 2 and 3: one image, two captions
    }


def fixed_losses() -> dict:
    from vcl_dist.losses import InfoNCELoss, SigmoidLoss, TripletLoss, VCRLLoss

    losses = {f"triplet {mode}": TripletLoss(0.2, mode) for mode in ("hardest", "semi_hard", "all")}
    losses |= {f"vcrl {mode}": VCRLLoss(0.5, 0.01, mode) for mode in ("hardest", "semi_hard", "all")}
    vcrl_tower = VCRLLoss(0.5, 0.01, "hardest", num_classes=3, embed_dim=8)
    with torch.no_grad():
        vcrl_tower.class_embeddings.copy_(torch.from_numpy(np.random.Generator(np.random.PCG64(3)).standard_normal((3, 8))))
    losses["vcrl hardest + label tower"] = vcrl_tower
    losses["infonce"] = InfoNCELoss(init_temperature=0.1)
    losses["sigmoid"] = SigmoidLoss(init_scale=5.0, init_bias=-2.0)
    return {name: loss.double() for name, loss in losses.items()}


def compute() -> dict:
    """The golden numbers of the code as it is: embeddings and every loss."""
    model, batch = fixed_model(), fixed_inputs()
    with torch.no_grad():
        image, text = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        losses = {name: loss(image, text, batch["label"], batch["group"]).item() for name, loss in fixed_losses().items()}
    return {"image_embeddings": image.tolist(), "text_embeddings": text.tolist(), "losses": losses}


def largest_drift(golden: dict, now: dict) -> dict[str, float]:
    """The largest absolute difference per entry (embeddings, each loss)."""
    drift = {key: float(np.abs(np.array(golden[key]) - np.array(now[key])).max())
             for key in ("image_embeddings", "text_embeddings")}
    drift |= {f"loss {name}": abs(golden["losses"][name] - now["losses"].get(name, float("nan")))
              for name in golden["losses"]}
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN.name} from the code as it is")
    args = parser.parse_args()
    now = compute()
    if args.write:
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return
    for key, value in largest_drift(json.loads(GOLDEN.read_text()), now).items():
        print(f"{key}: {value:.3g}")


if __name__ == "__main__":
    main()
