"""What the benchmark keeps under ``--out``/cache: the workload's data subset, trained models and references.

Files are safetensors with a JSON metadata entry, written atomically (a temporary file, then ``os.replace``), so an
interrupted run never leaves a half-written cache entry. Every path is named by the settings it depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def fingerprint(tensor: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-1 of the tensor's bytes: ties a cached reference to the weights it solved for."""
    return hashlib.sha1(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_cached(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` and ``meta`` (as JSON) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"json": json.dumps(meta)})
    os.replace(tmp, path)


def load_cached(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) stored at ``path``, or None when it is not cached."""
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("json", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def data_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / f"{cfg['name']}_n{cfg['n']}_t{cfg['test_index']}_data.safetensors"


def w1_weights_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / f"w1_n{cfg['n']}_wd{cfg['weight_decay']:g}_weights.safetensors"


def w2_model_path(cfg: dict) -> Path:
    return Path(cfg["cache_dir"]) / (
        f"w2_n{cfg['n']}_h{cfg['hidden']}_wd{cfg['weight_decay']:g}_seed{cfg['seed']}_gtol{cfg['gtol']:g}_model.safetensors"
    )


def reference_path(cfg: dict, kind: str) -> Path:
    """The cached reference solve on curvature ``kind`` ("hessian" or "ggn") of the workload's model."""
    stem = w1_weights_path(cfg).stem if cfg["name"] == "w1" else w2_model_path(cfg).stem
    return Path(cfg["cache_dir"]) / f"{stem}_ref-{kind}_damp{cfg['damping']:g}_t{cfg['test_index']}.safetensors"


def load_mnist_subset(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(x, y, test batch) read from MNIST (checksums verified), Koh & Liang's split; cached for the workers."""
    from influencekit.datasets import koh_liang_split, load_mnist

    split = koh_liang_split(load_mnist(cfg["data_dir"], verify=True))
    n = cfg["n"]
    if n > split.x_train.shape[0]:
        raise ValueError(f"n = {n} exceeds the {split.x_train.shape[0]} training images of Koh & Liang's split")
    x, y = split.x_train[:n].contiguous(), split.y_train[:n].contiguous()
    t = cfg["test_index"]
    test = (split.x_test[t : t + 1].contiguous(), split.y_test[t : t + 1].contiguous())
    save_cached(data_path(cfg), {"x": x, "y": y, "x_test": test[0], "y_test": test[1]}, {"source": "MNIST, Koh & Liang split"})
    return x, y, test


def load_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(x, y, test batch) from the cached subset, else from MNIST.

    Workers read the cached float64 subset, so their baseline memory and start-up do not include all of MNIST.
    """
    cached = load_cached(data_path(cfg))
    if cached is None:
        return load_mnist_subset(cfg)
    t = cached[0]
    return t["x"], t["y"], (t["x_test"], t["y_test"])
