"""The train and finetune stages: whole models trained on images, end to end.

``train`` freezes the backbone and trains the new head on decoded images (so, unlike a feature
cache, random augmentation is possible). ``finetune`` then unfreezes all or the last K blocks of
the backbone and trains at a low learning rate, the backbone's lower still, optionally after a
few head-only epochs, starting from a fit-head or train checkpoint. Both use the same seeded,
stratified sample (``--n``) and train/val split as extract and fit-head.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from .data import list_image_folder, stratified_order
from .device import resolve_workers
from .head import per_class_accuracy, run_dir, split_indices, validate_training

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What to train on, and how (train: frozen backbone, new head)."""

    data: str = "data/PetImages"  # ImageFolder root: one sub-folder of images per class
    n: int = 0  # images to use (a seeded stratified sample, unreadable ones skipped); 0 = all
    backbone: Optional[str] = "vgg16"  # a name from backbones.BACKBONES
    weights: Optional[str] = "DEFAULT"  # torchvision weights name, a state-dict file, or 'none'
    pool: Optional[str] = None  # head input: 'none' (flattened map), 'avg'; None = the backbone's own
    dropout: float = 0.0  # dropout before the head's linear layer when > 0
    augment: bool = False  # RandomResizedCrop + RandomHorizontalFlip on training images
    epochs: int = 3  # passes over the training split
    lr: float = 1e-3  # Adam learning rate of the head
    batch_size: int = 32  # images per optimisation step
    val_fraction: float = 0.125  # share of images held out for validation (stratified)
    print_every: int = 20  # a running accuracy/loss line every this many minibatches; 0 = never
    workers: int = -1  # decoding processes; -1 = one per CPU core (at most 8), 0 = decode in-process
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'
    precision: str = "auto"  # compute precision: auto (bf16 where supported), fp32, bf16, fp16 (CUDA)
    seed: int = 0  # seeds the sample, the split, the head's initialisation, shuffling and augmentation
    runs_dir: str = "runs"  # where model.pt and history.json go (one folder per run)


@dataclass
class FinetuneConfig(TrainConfig):
    """As TrainConfig, plus which blocks to unfreeze, their learning rate, and where to start."""

    backbone: Optional[str] = None  # None: the --init-head checkpoint's, else vgg16
    weights: Optional[str] = None  # None: the --init-head checkpoint's (found as load_model does), else DEFAULT
    epochs: int = 1  # passes over the training split, head-only epochs included
    lr: float = 1e-4  # Adam learning rate of the head
    backbone_lr: Optional[float] = None  # learning rate of the unfrozen backbone; None = lr / 10
    unfreeze: str = "all"  # 'all' or K: the last K blocks of the backbone (see `summary`)
    head_epochs: int = 0  # staged schedule: train only the head for this many epochs, then unfreeze
    init_head: Optional[str] = None  # start from a fit-head head.pt or a train/finetune model.pt


def validate(cfg: TrainConfig) -> None:
    validate_training(cfg, positive=("epochs", "batch_size"), non_negative=("n", "print_every"))
    if isinstance(cfg, FinetuneConfig):
        if cfg.backbone_lr is not None and cfg.backbone_lr <= 0:
            raise ValueError(f"--backbone-lr must be positive, got {cfg.backbone_lr}")
        if not 0 <= cfg.head_epochs <= cfg.epochs:
            raise ValueError(f"--head-epochs must be between 0 and --epochs ({cfg.epochs}), got {cfg.head_epochs}")


# -- data --------------------------------------------------------------------------------------
def train_transform(transform, augment: bool):
    """The weights' preprocessing, or with --augment: a random resized crop and flip, then its normalisation."""
    if not augment:
        return transform
    import torch
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(transform.crop_size[0], interpolation=transform.interpolation,
                            antialias=transform.antialias),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
        T.ConvertImageDtype(torch.float),
        T.Normalize(transform.mean, transform.std),
    ])


def collate_good(batch):
    """(images, labels, [(path, reason) of unreadable files]): bad files are dropped, not fatal."""
    import torch

    good = [b for b in batch if b[1] is not None]
    x = torch.stack([b[1] for b in good]) if good else None
    y = torch.tensor([b[2] for b in good], dtype=torch.long)
    return x, y, [(b[3], b[4]) for b in batch if b[1] is None]


def _loader(root, items, transform, cfg: TrainConfig, shuffle: bool):
    import torch
    from torch.utils.data import DataLoader

    from .extract import ImageListDataset

    workers = resolve_workers(cfg.workers)
    return DataLoader(ImageListDataset(root, items, transform), batch_size=cfg.batch_size, shuffle=shuffle,
                      num_workers=workers, collate_fn=collate_good, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(cfg.seed))


def sample_split(labels: np.ndarray, n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Listing indices of the train and val images: the first n of the stratified order, then the shared split.

    The sample keeps extract's order (the order of a cache's rows), so with the same --n and seed
    the validation images are those fit-head and compare-sklearn hold out (unless extract replaced
    unreadable files): fine-tuning from a fit-head checkpoint is validated on images its head never saw.
    """
    if n > len(labels):
        raise ValueError(f"--n {n} is more than the {len(labels)} images in the data folder")
    chosen = stratified_order(labels, seed)[:n or len(labels)]
    train, val = split_indices(labels[chosen], val_fraction, seed)
    return chosen[train], chosen[val]


# -- loops -------------------------------------------------------------------------------------
class _Skipped:
    """Unreadable files, each logged once."""

    def __init__(self):
        self.files = {}

    def add(self, bad):
        for path, reason in bad:
            if path not in self.files:
                log.warning("skipping %s: %s", path, reason)
                self.files[path] = reason


def evaluate(model, loader, device, precision, skipped: _Skipped) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Accuracy, mean NLL, labels and predictions over a loader."""
    import torch

    from .device import autocast

    model.eval()
    loss_sum, ys, preds = 0.0, [], []
    with torch.inference_mode():
        for x, y, bad in loader:
            skipped.add(bad)
            if x is None:
                continue
            with autocast(device, precision):
                out = model(x.to(device).contiguous(memory_format=torch.channels_last))
            out = out.float().cpu()
            loss_sum += float(torch.nn.functional.nll_loss(out, y, reduction="sum"))
            ys.append(y.numpy())
            preds.append(out.argmax(1).numpy())
    if not ys:
        raise ValueError("no validation image could be decoded")
    y, pred = np.concatenate(ys), np.concatenate(preds)
    return float((pred == y).mean()), loss_sum / len(y), y, pred


def _train_epoch(model, loader, opt, device, precision, epoch: int, print_every: int, skipped: _Skipped):
    import torch
    from .progress import progress

    from .device import autocast

    model.train()
    seen = correct = 0
    loss_sum = 0.0
    bar = progress(total=len(loader.dataset), desc=f"epoch {epoch}", unit="img", leave=False)
    for b, (x, y, bad) in enumerate(loader, 1):
        skipped.add(bad)
        bar.update(len(y) + len(bad))
        if x is None:
            continue
        x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
        opt.zero_grad()
        with autocast(device, precision):
            out = model(x)
        loss = torch.nn.functional.nll_loss(out.float(), y)
        loss.backward()
        opt.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += int((out.argmax(1) == y).sum())
        if print_every and b % print_every == 0:
            bar.write(f"Epoch {epoch}, batch {b}: running train acc={correct / seen:.3f}, "
                      f"loss={loss_sum / seen:.4f}", file=sys.stderr)
    bar.close()
    if not seen:
        raise ValueError("no training image could be decoded")
    return correct / seen, loss_sum / seen, seen


def _fit(cfg: TrainConfig, kind: str, lm, stages: list, listing) -> dict:
    """Train ``lm`` on ``listing`` epoch by epoch; ``stages[e]`` = (unfreeze value, stage name) for epoch e."""
    import torch

    from .device import resolve_device, resolve_precision
    from .models import count_params, save_model

    if list(listing.classes) != lm.classes:
        raise ValueError(f"the model's classes {lm.classes} differ from the data's {list(listing.classes)}")
    train_idx, val_idx = sample_split(listing.labels, cfg.n, cfg.val_fraction, cfg.seed)
    items = [(f.path, f.label) for f in listing.files]
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model = lm.model.to(device, memory_format=torch.channels_last)
    train_loader = _loader(listing.root, [items[i] for i in train_idx], train_transform(lm.transform, cfg.augment),
                           cfg, shuffle=True)
    val_loader = _loader(listing.root, [items[i] for i in val_idx], lm.transform, cfg, shuffle=False)
    backbone_lr = getattr(cfg, "backbone_lr", None) or cfg.lr / 10
    opt = torch.optim.Adam([{"params": model.head.parameters(), "lr": cfg.lr},
                            {"params": model.features.parameters(), "lr": backbone_lr}])
    skipped, history, stage = _Skipped(), [], None
    log.info("%s: %d train / %d val images of %s, device %s, precision %s", kind, len(train_idx), len(val_idx),
             cfg.data, device, precision)
    t0 = time.time()
    for epoch in range(1, cfg.epochs + 1):  # epochs count from 1 everywhere: logs, history, curves
        unfreeze, name = stages[epoch - 1]
        if name != stage:
            model.set_trainable(unfreeze)  # frozen parameters get no gradient, so Adam leaves them alone
            total, trainable = count_params(model)
            log.info("epoch %d: %s stage, %s of %s parameters trainable", epoch, name, f"{trainable:,}",
                     f"{total:,}")
            stage = name
        train_acc, train_loss, seen = _train_epoch(model, train_loader, opt, device, precision, epoch,
                                                   cfg.print_every, skipped)
        val_acc, val_loss, y_val, pred = evaluate(model, val_loader, device, precision, skipped)
        row = {"epoch": epoch, "stage": name, "trainable_params": count_params(model)[1], "train_acc": train_acc,
               "val_acc": val_acc, "train_loss": train_loss, "val_loss": val_loss, "seconds": time.time() - t0}
        history.append(row)
        print(f"Epoch {epoch}, Train acc={train_acc:.3f}, Val acc={val_acc:.3f}, "
              f"Train loss={train_loss:.3f}, Val loss={val_loss:.3f}", file=sys.stderr)
    seconds = time.time() - t0
    per_class = per_class_accuracy(y_val, pred, lm.classes)
    metrics = {**history[-1], "per_class_val_acc": per_class, "train_rows": int(seen), "val_rows": int(len(y_val)),
               "skipped": len(skipped.files)}
    out_dir = run_dir(cfg.runs_dir, kind)
    lm.model.to("cpu")
    save_model(lm, out_dir / "model.pt", kind, asdict(cfg), metrics, history)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    from . import plots

    curves = plots.curves(history, out_dir / "curves.png")
    from .ledger import append_run

    append_run(cfg.runs_dir, kind, backbone=lm.info["backbone"], params=asdict(cfg),
               metrics={k: metrics[k] for k in ("val_acc", "val_loss", "train_acc", "train_loss")},
               outputs=[out_dir / "model.pt", curves])
    return {"run_dir": str(out_dir), "checkpoint": str(out_dir / "model.pt"), "curves": str(curves),
            "backbone": lm.info["backbone"], **metrics,
            "skipped_files": [{"path": p, "why": w} for p, w in skipped.files.items()],
            "device": str(device), "precision": precision, "fit_seconds": seconds,
            "img_per_s": (seen + len(y_val)) * cfg.epochs / seconds if seconds > 0 else 0.0, "history": history}


def train(cfg: TrainConfig) -> dict:
    """Backbone frozen, a new head trained on the images; returns metrics and the checkpoint path."""
    import torch

    from .models import build_model

    validate(cfg)
    listing = list_image_folder(cfg.data)
    torch.manual_seed(cfg.seed)
    lm = build_model(cfg.backbone or "vgg16", cfg.weights or "DEFAULT", listing.classes, cfg.pool, cfg.dropout)
    return _fit(cfg, "train", lm, [(0, "head")] * cfg.epochs, listing)


def finetune(cfg: FinetuneConfig) -> dict:
    """Backbone (or its last K blocks) unfrozen at a low learning rate, after optional head-only epochs."""
    import torch

    from .models import build_model, load_model, parse_unfreeze

    validate(cfg)
    unfreeze = parse_unfreeze(cfg.unfreeze)
    if unfreeze == 0:
        raise ValueError("--unfreeze none leaves nothing of the backbone to fine-tune; use train, 'all' or K")
    listing = list_image_folder(cfg.data)
    torch.manual_seed(cfg.seed)
    if cfg.init_head:
        lm = load_model(cfg.init_head, cfg.weights)
        if cfg.backbone and cfg.backbone != lm.info["backbone"]:
            raise ValueError(f"--backbone {cfg.backbone} differs from {cfg.init_head}'s {lm.info['backbone']}")
        if cfg.pool and cfg.pool != lm.info["pool"]:
            raise ValueError(f"--pool {cfg.pool} differs from {cfg.init_head}'s {lm.info['pool']}")
    else:
        lm = build_model(cfg.backbone or "vgg16", cfg.weights or "DEFAULT", listing.classes, cfg.pool, cfg.dropout)
    lm.model.set_trainable(unfreeze)  # fails early when K is more than the backbone's blocks
    stages = [(0, "head") if e < cfg.head_epochs else (unfreeze, "finetune") for e in range(cfg.epochs)]
    return _fit(cfg, "finetune", lm, stages, listing)
