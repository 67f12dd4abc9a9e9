"""Which vanilla recipe learns fast without batch norm: a CPU probe on a subset.

Trains the 6C2F vanilla network for a few epochs on a subset of the JPEG copy's
training split with several recipes (the same batches, the same subset, the
pipeline's model, loader and lr schedule) and prints the validation accuracy
after each epoch. Gradient clipping is not a key of the vanilla stage; it is
probed here to see whether it would matter.

    python tools/vanilla_recipe_probe.py --archive ../shared/data/cifar10-jpeg.tar.gz \
        --train 10000 --val 2000 --epochs 5 --out /tmp/probe.json

A few CPU epochs on a subset rank recipes by how fast they leave chance; they do
not predict the accuracy of a full GPU run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_src.data.cifar import build_cache, load_cache  # noqa: E402
from pipeline_src.data.loader import DeviceBatches  # noqa: E402
from pipeline_src.models import build_model  # noqa: E402
from pipeline_src.training.common import evaluate, learning_rate, set_learning_rate  # noqa: E402

BASE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
        "schedule": "cosine", "warmup_epochs": 2, "init": "kaiming", "clip": None}
RECIPES = {
    "sgd-0.05-he (params.yaml)": {},
    "sgd-0.01-he": {"lr": 0.01},
    "sgd-0.05-reference": {"init": "reference"},
    "sgd-0.05-he-clip1": {"clip": 1.0},
    "adam-1e-3-he": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1},
    "adam-1e-3-reference": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1,
                            "init": "reference"},
    "adam-3e-4-he": {"optimizer": "adam", "lr": 3e-4, "weight_decay": 0.0, "warmup_epochs": 1},
}


def probe(recipe: dict, data, train: int, val: int, epochs: int, seed: int) -> list[float]:
    cfg = {**BASE, **recipe, "epochs": epochs}
    torch.manual_seed(seed)
    model = build_model({"arch": "6C2F", "activation": "relu", "clipped_relu_theta": 2.0, "init": cfg["init"]})
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    batches = DeviceBatches(data.train_x[:train], data.train_y[:train], 128, torch.device("cpu"), shuffle=True,
                            crop_padding=4, flip=True, generator=generator)
    held_out = DeviceBatches(data.val_x[:val], data.val_y[:val], 500, torch.device("cpu"))
    accuracies = []
    for epoch in range(epochs):
        for step, (x, y) in enumerate(batches):
            set_learning_rate(optimizer, learning_rate(cfg, epoch + step / len(batches)))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            optimizer.step()
        accuracies.append(evaluate(model, held_out)["accuracy"])
    return accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--cache", default="/tmp/vanilla_probe/cifar10.pt")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", nargs="+", default=None, help="names from RECIPES (default: all)")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    cache = Path(args.cache)
    if not cache.is_file():
        build_cache({"source": "images", "path": str(Path(args.archive).resolve()), "sha256": None,
                     "val_size": 5000, "split_seed": 0}, cache, cache.with_name("provenance.json"), Path("."))
    data = load_cache(cache)
    results = {}
    for name in args.recipes or RECIPES:
        started = time.perf_counter()
        results[name] = probe(RECIPES[name], data, args.train, args.val, args.epochs, args.seed)
        print(f"{name:28s} val acc per epoch: {' '.join(f'{a:5.1f}' for a in results[name])} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"train": args.train, "val": args.val, "epochs": args.epochs,
                                              "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
