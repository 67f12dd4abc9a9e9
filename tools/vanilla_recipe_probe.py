"""Which vanilla recipe leaves chance fast without batch norm: a CPU probe on a subset.

Trains the vanilla network (params.yaml's model block, 6C2F) for a few epochs on a
seeded, stratified subset of the training split (every class in proportion; the JPEG
copy's splits are sorted by class, so the first N images would be one or two classes)
with several recipes: the same subset, the same batches, the pipeline's model, loader
and lr schedule. The schedule is the full run's (`--schedule-epochs`, 200 as
params.yaml), so a few epochs probe its start: the warm-up and the peak lr. Prints the
train loss and the validation accuracy (a stratified subset of the validation split)
after each epoch. Gradient clipping is not a key of the vanilla stage; it is probed to
see whether it would matter.

    python tools/vanilla_recipe_probe.py --archive ../shared/data/cifar10-jpeg.tar.gz \
        --train 5000 --val 2000 --epochs 4 --out /tmp/probe.json

A few CPU epochs on a subset rank recipes by whether and how fast they leave chance;
they do not predict the accuracy of a full GPU run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_src.config import load_params  # noqa: E402
from pipeline_src.data.cifar import build_cache, load_cache  # noqa: E402
from pipeline_src.data.loader import DeviceBatches  # noqa: E402
from pipeline_src.data.subsets import stratified_indices  # noqa: E402
from pipeline_src.models import build_model  # noqa: E402
from pipeline_src.training.common import evaluate, learning_rate, set_learning_rate  # noqa: E402

# Every recipe is params.yaml's vanilla block and model block with these changes; all
# use a 1-epoch warm-up (the warm-up with which the default recipe was seen stuck at
# chance), except where a recipe names another.
SHORT_WARMUP = {"warmup_epochs": 1}
RECIPES = {
    "sgd-0.05-he": {"optimizer": "sgd", "lr": 0.05, "init": "kaiming"},
    "sgd-0.05-reference": {"optimizer": "sgd", "lr": 0.05, "init": "reference"},
    "sgd-0.01-he": {"optimizer": "sgd", "lr": 0.01, "init": "kaiming"},
    "sgd-0.01-reference": {"optimizer": "sgd", "lr": 0.01, "init": "reference"},
    "sgd-0.05-he-clip1": {"optimizer": "sgd", "lr": 0.05, "init": "kaiming", "clip": 1.0},
    "adam-1e-3-he": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "init": "kaiming"},
    "adam-1e-3-reference": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "init": "reference"},
    "adam-1e-3-he-no-warmup": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "init": "kaiming",
                               "warmup_epochs": 0},
}


def recipe_config(base: dict, model: dict, recipe: dict, schedule_epochs: int) -> tuple[dict, dict]:
    cfg = {**base, **SHORT_WARMUP, "clip": None, "epochs": schedule_epochs,
           **{k: v for k, v in recipe.items() if k != "init"}}
    return cfg, {**model, "init": recipe.get("init", model["init"])}


def probe(cfg: dict, model_params: dict, data, train_index, val_index, epochs: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    model = build_model(model_params)
    if cfg["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                    nesterov=cfg["nesterov"], weight_decay=cfg["weight_decay"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    generator = torch.Generator().manual_seed(seed)
    batches = DeviceBatches(data.train_x[train_index], data.train_y[train_index], cfg["batch_size"],
                            torch.device("cpu"), shuffle=True, crop_padding=cfg["augment"]["crop_padding"],
                            flip=cfg["augment"]["flip"], generator=generator)
    held_out = DeviceBatches(data.val_x[val_index], data.val_y[val_index], 500, torch.device("cpu"))
    rows = []
    for epoch in range(epochs):
        loss_sum, seen = 0.0, 0
        for step, (x, y) in enumerate(batches):
            set_learning_rate(optimizer, learning_rate(cfg, epoch + step / len(batches)))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
            optimizer.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
        rows.append({"epoch": epoch + 1, "train_loss": loss_sum / seen,
                     "val_accuracy": evaluate(model, held_out)["accuracy"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--cache", default="/tmp/vanilla_probe/cifar10.pt")
    parser.add_argument("--train", type=int, default=5000, help="training images (stratified subset)")
    parser.add_argument("--val", type=int, default=2000, help="validation images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs trained")
    parser.add_argument("--schedule-epochs", type=int, default=None,
                        help="epochs of the lr schedule (default: params.yaml's vanilla.epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--recipes", nargs="+", default=None, help="names from RECIPES (default: all)")
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params()
    schedule_epochs = args.schedule_epochs or params["vanilla"]["epochs"]
    cache = Path(args.cache)
    data_params = {"source": "images", "path": str(Path(args.archive).resolve()), "sha256": None,
                   "val_size": 5000, "split_seed": 0}
    if not cache.is_file():
        build_cache(data_params, cache, cache.with_name("provenance.json"), Path("."))
    data = load_cache(cache)
    train_index = stratified_indices(data.train_y, args.train, seed=1)
    val_index = stratified_indices(data.val_y, args.val, seed=2)
    results = {}
    for name in args.recipes or RECIPES:
        cfg, model_params = recipe_config(params["vanilla"], params["model"], RECIPES[name], schedule_epochs)
        for seed in args.seeds:
            started = time.perf_counter()
            rows = probe(cfg, model_params, data, train_index, val_index, args.epochs, seed)
            seconds = time.perf_counter() - started
            results[f"{name} seed {seed}"] = {"recipe": name, "seed": seed, "config": cfg,
                                              "init": model_params["init"], "epochs": rows, "seconds": seconds}
            losses = " ".join(f"{r['train_loss']:.2f}" for r in rows)
            accuracies = " ".join(f"{r['val_accuracy']:5.1f}" for r in rows)
            print(f"{name:22s} seed {seed}: loss {losses} | val acc {accuracies} ({seconds:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "train": args.train, "val": args.val, "epochs": args.epochs, "schedule_epochs": schedule_epochs,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "data": data.provenance.get("path"), "lossy_jpeg": data.provenance.get("lossy_jpeg"),
            "results": results}, indent=1))


if __name__ == "__main__":
    main()
