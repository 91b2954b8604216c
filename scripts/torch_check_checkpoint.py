#!/usr/bin/env python3
"""Loads a Strata checkpoint of the reference CNN into a PyTorch module and evaluates it.

    scripts/torch_check_checkpoint.py CHECKPOINT_DIR [DATA_DIR] [--limit N]

CHECKPOINT_DIR is an `epoch-N` directory (single-node training, or pipeline stages merged
by `strata checkpoint merge`). The parameters are loaded with `load_state_dict(strict=True)`
under their own names, so any name or shape that differs from PyTorch's fails here. The
test accuracy on the first N Fashion-MNIST test images (normalised by the training set's
mean and standard deviation, as Strata does) is printed as JSON, to compare with the
accuracy Strata printed. Needs only torch (safetensors files are parsed here).
"""
import gzip
import json
import os
import struct
import sys

import torch
from torch import nn


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", f"{name}: dtype {meta['dtype']}"
        a, b = meta["data_offsets"]
        out[name] = torch.frombuffer(bytearray(body[a:b]), dtype=torch.float32).reshape(meta["shape"])
    return out


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    (magic,) = struct.unpack(">I", raw[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, raw[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def find(data, stem):
    for name in (stem, stem + ".gz"):
        if os.path.exists(os.path.join(data, name)):
            return os.path.join(data, name)
    sys.exit(f"{stem} not found in {data}")


def main():
    args = sys.argv[1:]
    limit = 10000
    if "--limit" in args:
        i = args.index("--limit")
        limit = int(args[i + 1])
        del args[i : i + 2]
    ck = args[0]
    data = args[1] if len(args) > 1 else "/usr/share/datasets/fashion-mnist"
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 64, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    model.add_module("pool1", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(64, 128, 3, padding=1))
    model.add_module("relu2", nn.ReLU())
    model.add_module("pool2", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(128 * 7 * 7, 512))
    model.add_module("relu3", nn.ReLU())
    model.add_module("fc2", nn.Linear(512, 10))
    model.load_state_dict(read_safetensors(os.path.join(ck, "model.safetensors")), strict=True)
    train = read_idx(find(data, "train-images-idx3-ubyte")).float() / 255.0
    mean, std = train.mean().item(), train.std(unbiased=False).item()
    x = (read_idx(find(data, "t10k-images-idx3-ubyte"))[:limit].float() / 255.0 - mean) / std
    y = read_idx(find(data, "t10k-labels-idx1-ubyte"))[:limit].long()
    with torch.no_grad():
        pred = model(x.unsqueeze(1)).argmax(1)
    print(json.dumps({"checkpoint": ck, "samples": len(y), "test_accuracy": (pred == y).float().mean().item()}))


if __name__ == "__main__":
    main()
