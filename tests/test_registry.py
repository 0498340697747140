"""A method is one module: its decorated editor lands in the registry, and its schema composes."""
import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

import editlab.methods
from editlab.compose import register_configs
from editlab.config import CONF_DIR
from editlab.methods import EditorContext, build_editor
from editlab.registry import METHODS, register_method

TOY = '''
from dataclasses import dataclass, field
from typing import List

from editlab.methods.base import Editor
from editlab.registry import register_method


@dataclass
class ToyHparams:
    layers: List[int] = field(default_factory=lambda: [0])
    scale: float = 1.0


@register_method("toy", hparams=ToyHparams)
class ToyEditor(Editor):
    def apply(self, lm, requests):
        raise NotImplementedError
'''


@pytest.fixture
def toy_dir(tmp_path, monkeypatch):
    """``toy_method.py`` importable, and a conf dir holding ``method/toy.yaml``; both gone after."""
    (tmp_path / "toy_method.py").write_text(TOY)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "toy.yaml").write_text(
        "defaults: [toy_schema]\nname: toy\nper_model:\n  tiny-gpt2: {layers: [1], scale: 2.0}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    METHODS.pop("toy", None)
    sys.modules.pop("toy_method", None)


def compose_toy(conf: Path, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config",
                       overrides=[f"hydra.searchpath=[file://{conf}]", "method=toy", "model=tiny-gpt2", *overrides])


def test_a_decorated_editor_in_its_own_module_is_a_method(toy_dir, tmp_path):
    toy = importlib.import_module("toy_method")
    assert METHODS["toy"] is toy.ToyEditor
    assert (toy.ToyEditor.name, toy.ToyEditor.Hparams) == ("toy", toy.ToyHparams)
    cfg = compose_toy(toy_dir / "conf", "method.layers=[2]")
    editor = build_editor(cfg.method, cfg.model.name, EditorContext(tmp_path, tmp_path, 0))
    assert isinstance(editor, toy.ToyEditor) and (editor.hp.layers, editor.hp.scale) == ([2], 2.0)
    with pytest.raises(ConfigCompositionException):  # the schema holds only the method's fields
        compose_toy(toy_dir / "conf", "method.scal=3")


def test_an_entry_point_registers_an_out_of_tree_method(toy_dir, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="toy", value="toy_method", group="editlab.methods")
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep] if group == "editlab.methods" else [])
    importlib.reload(editlab.methods)
    assert METHODS["toy"].__module__ == "toy_method"


def test_two_editors_under_one_name_are_an_error():
    with pytest.raises(ValueError, match="'rome' is registered twice"):
        @register_method("rome", hparams=METHODS["rome"].Hparams)
        class Impostor:
            pass
    assert METHODS["rome"].__name__ == "ROMEEditor"


def test_every_method_module_registers_one_method_with_its_yaml():
    yamls = {p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml")}
    assert set(METHODS) == yamls
    assert {cls.__module__ for cls in METHODS.values()} == {f"editlab.methods.{name}" for name in METHODS}
