import os
from pathlib import Path

import pytest

from editlab.compose import register_configs

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("EDITLAB_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("EDITLAB_DATA", str(DATA))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

register_configs()


def compose(*overrides: str):
    """A real config composed from conf/ with Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from editlab.cli import CONF_DIR, normalize_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=normalize_overrides(list(overrides)))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data tests run on; missing, they skip locally but fail in CI, where a skip would pass
    a run that tested nothing."""
    if not (DATA / "counterfact").exists():
        message = f"no data at {DATA}: set EDITLAB_DATA to the directory that holds counterfact/"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{message} (CI={os.environ['CI']}: missing data is an error, not a skip)")
        pytest.skip(message)
    return DATA


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """editlab's own cache (as runs use it): SmolLM2's converted copy and key statistics are
    reused across test sessions instead of being rebuilt every time."""
    return Path(os.environ.get("EDITLAB_CACHE", Path.home() / ".cache" / "editlab"))


def _load(name: str, cache_dir):
    from editlab.models import load_model

    return load_model(compose(f"model={name}").model, cache_dir)


@pytest.fixture(scope="session")
def smollm(cache_dir):
    """The real SmolLM2-135M (slow tests only)."""
    return _load("smollm2-135m", cache_dir)


@pytest.fixture
def tiny(request, cache_dir):
    return _load(request.param, cache_dir)


def sequential_efficacy(lm, cfg, n: int, cache_dir: Path, data_root: Path) -> list[float]:
    """ES of each of the first ``n`` edits of ``cfg``'s sample, scored right after it was applied
    in sequence by ``cfg``'s method; the model's weights are restored afterwards."""
    from editlab.data import build_requests
    from editlab.deltas import WeightWriter
    from editlab.evaluate.rewrite import score_requests
    from editlab.methods import EditorContext, build_editor

    editor = build_editor(cfg.method, cfg.model.name, EditorContext(cache_dir=cache_dir, data_root=data_root, seed=0))
    requests = build_requests(cfg.data, cfg.sample)[:n]
    editor.prepare(lm, requests)
    weights = WeightWriter(lm.model)
    es = []
    try:
        for r in requests:
            weights.apply(editor.apply(lm, [r]))
            es.append(score_requests(lm.model, lm.tok, [r], neighborhood=False)[0]["es"])
    finally:
        weights.reset()
    return es
