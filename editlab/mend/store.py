"""A trained editor on disk: ``editor.safetensors`` (weights + norm statistics) and ``config.json``.

The hash that identifies an editor in a run's config is the sha256 of ``editor.safetensors``.
``train_state.pt`` (optimizer, step, data cursor) sits beside them only to resume training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editlab.checkpoint import sha256_file
from editlab.mend.net import MENDNet, NetSpec

WEIGHTS = "editor.safetensors"
CONFIG = "config.json"
FORMAT = "editlab-mend/1"


def _replace(tmp: Path, dst: Path) -> None:
    os.replace(tmp, dst)  # atomic: a reader never sees a half-written file


def save_editor(out_dir: Path, net: MENDNet, meta: dict[str, Any]) -> str:
    """Write weights then config (both atomically); returns the weights' sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    _replace(tmp, out_dir / WEIGHTS)
    config = {"format": FORMAT, "spec": dataclasses.asdict(net.spec), **meta}
    tmp = out_dir / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    _replace(tmp, out_dir / CONFIG)
    return sha256_file(out_dir / WEIGHTS)


def spec_of(config: dict[str, Any], where: Path) -> NetSpec:
    try:
        s = config["spec"]
        return NetSpec(layers=tuple(s["layers"]), shapes=tuple(tuple(x) for x in s["shapes"]),
                       rank=int(s["rank"]), depth=int(s["depth"]), init_lr=float(s["init_lr"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: field 'spec' is missing or malformed ({e!r})") from e


def load_editor(path: str | Path, device: torch.device | str = "cpu") -> tuple[MENDNet, dict[str, Any], str]:
    """``(net in eval mode, config, sha256)`` of the editor in directory ``path``."""
    path = Path(path).expanduser()
    weights, cfg_file = path / WEIGHTS, path / CONFIG
    for f in (weights, cfg_file):
        if not f.exists():
            raise FileNotFoundError(f"{f} does not exist: method.editor_path must be a directory written by "
                                    "`editlab train-mend`")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON: {e}") from e
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: field 'format' is {config.get('format')!r}, expected {FORMAT!r}")
    net = MENDNet(spec_of(config, cfg_file))
    state = load_file(str(weights))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match the spec in {cfg_file}: {e}") from e
    return net.to(device).eval(), config, sha256_file(weights)
