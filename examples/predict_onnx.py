"""Classify photos with an exported model and nothing of this project: onnxruntime, numpy and Pillow only.

    python examples/predict_onnx.py catsdogs.onnx photo.jpg [more photos...]

The preprocessing is read from the metadata beside the file (catsdogs.onnx.json), and done as torchvision does
it for the weights: resize the shorter side (Pillow's antialiased resize), center crop, scale to [0, 1],
normalise by mean and std. Prints one JSON row per photo: path, class, probability, and when the model has an
unknown score, unknown (the score above the metadata's unknown_threshold: none of these classes) and ood_score.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

BATCH = 16  # photos per run: a VGG-16 batch of 16 needs about 1 GB
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess(path: str, p: dict) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    size = (p["resize_size"], int(p["resize_size"] * long / short))
    im = im.resize(size if w <= h else size[::-1], RESAMPLE[p["interpolation"]])
    w, h = im.size
    c = p["crop_size"]
    left, top = int(round((w - c) / 2.0)), int(round((h - c) / 2.0))
    x = np.asarray(im.crop((left, top, left + c, top + c)), np.float32) / 255.0
    x = (x - np.array(p["mean"], np.float32)) / np.array(p["std"], np.float32)
    return x.transpose(2, 0, 1)  # HWC -> CHW


def main(model: str, photos: list) -> None:
    meta = json.loads(Path(model + ".json").read_text())
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o["name"] for o in meta["outputs"]]
    for i in range(0, len(photos), BATCH):
        chunk = photos[i:i + BATCH]
        batch = np.stack([preprocess(p, meta["preprocessing"]) for p in chunk])
        out = dict(zip(names, session.run(names, {"images": batch})))
        for k, (path, p) in enumerate(zip(chunk, out["probabilities"])):
            best = int(p.argmax())
            row = {"path": path, "class": meta["classes"][best], "probability": float(p[best])}
            if "unknown_score" in out:
                score = float(out["unknown_score"][k])
                row.update(unknown=score > meta["unknown_threshold"], ood_score=round(score, 6))
            print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
