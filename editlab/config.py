"""Structured-config schemas for every config group.

Each option file under ``conf/<group>/`` starts its defaults list with ``<group>_schema`` (or
``<method>_schema`` for methods), a dataclass registered here in Hydra's ConfigStore, so a misspelt
key in a yaml file or on the command line is a composition error rather than a silently ignored
setting.

Methods have a second layer: their hyperparameters differ per model.  A method's yaml carries a
``per_model`` table (one row per ``model.name``); the effective hyperparameters are
``dataclass defaults <- per_model[model.name] <- any non-null top-level key`` (see
:func:`resolve_hparams`).  Top-level hyperparameter keys are therefore ``null`` in the yaml and
only set by users on the command line (``method.layers=[5]``), which always wins.  A model with no
row takes the row of the method's ``reference_model`` with its layers moved to the same relative
depth of the model's layer count (never the reference's absolute layer numbers).

A method derived from another starts from its rows: ``inherit: memit`` takes
``conf/method/memit.yaml``'s rows, keeping the keys this method's schema has, and merges its own
rows over them (see :func:`with_inherited`).  So EMMET, AlphaEdit and ENCORE follow MEMIT's
per-model choices instead of carrying copies that drift.

This module is read by the methods and never reads them: a method's schema reaches Hydra through
``editlab.registry`` (see ``editlab.compose.register_configs``).
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)

# An absolute path works both from a checkout and from an installed wheel (conf/ ships inside).
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


@dataclass
class ArchConfig:
    """Module names of a model (``{}`` stands for the layer index), for architectures missing
    from ``editlab.models.arch.ARCHS`` or laid out differently; null entries come from the table
    or from probing the module tree.  ``mlp`` defaults to ``mlp_out``'s parent, ``transposed`` to
    whether ``mlp_out`` is a Conv1D."""

    layers: Optional[str] = None  # the list of blocks, e.g. model.layers
    mlp_out: Optional[str] = None  # e.g. model.layers.{}.mlp.down_proj (the edited matrix)
    mlp: Optional[str] = None
    final_norm: Optional[str] = None
    unembed: Optional[str] = None
    embed: Optional[str] = None
    transposed: Optional[bool] = None  # weight stored [in, out]


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "hub"  # hub | gguf | tiny
    hub_id: Optional[str] = None
    gguf_package: Optional[str] = None  # python package that ships the .gguf file; null: gguf_file is a path
    gguf_file: Optional[str] = None  # a file in gguf_package, or a path on disk (absolute, or with no package)
    tiny_arch: Optional[str] = None  # a family of editlab.models.tiny (random weights, tests only)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto -> cuda when available, else cpu; unused with device_map
    # Spread the model over devices (needs accelerate): auto | balanced | ... or {module: device}.
    device_map: Optional[Any] = None
    revision: Optional[str] = None
    arch: ArchConfig = field(default_factory=ArchConfig)


@dataclass
class SampleConfig:
    index: int = 1  # the paper's order k (1..10)
    n_edits: int = 1000
    batch_size: int = 1  # requests per editing step


@dataclass
class EvalConfig:
    name: str = MISSING
    # Periods in edits; 0 switches a measurement off.  Every enabled measurement is also taken
    # before the first edit and after the last one.
    new_edit_every: int = 1
    forget_every: int = 10
    downstream_every: int = 10
    distance_every: int = 1
    windows: List[int] = field(default_factory=lambda: [5, 50])
    forget_paraphrase: bool = True
    # Forgetting rounds over a fixed seeded sample of N earlier edits (0 = all of them, exact);
    # the same seed gives every run of a sweep the same sample (editlab/evaluate/forgetting.py).
    forget_sample: int = 0
    forget_sample_seed: int = 0
    downstream_tasks: List[str] = field(default_factory=lambda: ["sst2", "mrpc", "rte", "cola"])
    downstream_n: int = 200  # examples per task (balanced subsets hold 200)
    downstream_generate: bool = True  # the paper's score: generate, parse, weighted F1
    downstream_likelihood: bool = True  # cheaper: compare label-word likelihoods
    generate_tokens: int = 3
    batch_size: int = 32
    # Fluency (n-gram entropy of sampled text, logged as gen/fluency): the first fluency_prompts
    # generation prompts of the stream's records, top-5 sampling to fluency_tokens tokens in all.
    fluency_every: int = 0
    fluency_prompts: int = 20
    fluency_tokens: int = 100
    confirm_disabling: bool = False  # re-apply each disabling edit alone to the unedited model
    # Collapse detection (editlab/evaluate/collapse.py): single-step distance jumps measured
    # against the running median of earlier jumps.
    disabling_factor: float = 100.0  # jump over running median that flags a disabling edit
    onset_factor: float = 10.0  # jump that may start a collapse, if efficacy and downstream fall
    collapse_window: int = 10  # steps of new-edit efficacy compared before/after a jump
    collapse_es_drop: float = 0.3  # efficacy fall that counts as collapse
    collapse_f1_drop: float = 0.1  # downstream mean F1 fall that counts as collapse
    collapse_min_history: int = 3  # earlier jumps needed before any jump is flagged


@dataclass
class TrackerConfig:
    name: str = MISSING  # wandb | none
    mode: Optional[str] = None  # online | offline | disabled; null = online iff an API key exists
    project: str = "editlab"
    entity: Optional[str] = None
    group: Optional[str] = None  # null = the Hydra sweep dir under multirun, else no group
    job_type: str = "edit-stream"
    tags: List[str] = field(default_factory=list)
    checkpoint_artifacts: bool = True  # register checkpoints as W&B artifacts by reference
    plots: bool = True  # draw the PNG figures + report.html into <run_dir>/plots at the end


@dataclass
class DataConfig:
    root: str = "${oc.env:EDITLAB_DATA,./data}"
    counterfact: str = "counterfact/original_schema_subset/counterfact_original_schema_2715.json"
    sample_orders: str = "counterfact/paper_sample_indices/counterfact_sampled_unique_10_20391.json"
    glue: str = "glue/paper_subsets/gradual-catastrophic-forgetting"
    wikitext: str = "wikitext/wikitext-2-raw"
    # For users with internet: fetch a missing CounterFact / sample-orders file from its public URL
    # (the full counterfact.json; point data.counterfact at e.g. counterfact/counterfact.json).
    download: bool = False
    counterfact_url: Optional[str] = "https://rome.baulab.info/data/dsets/counterfact.json"
    sample_orders_url: str = (
        "https://raw.githubusercontent.com/scalable-model-editing/gradual-catastrophic-forgetting/"
        "32eaa57ca105ea65a4f3bd86eeb7f4234f173ec8/counterfact_sampled_unique_10_20391.json"
    )
    # Which edits the stream takes: counterfact (the files above) or zsre (docs/data.md, "zsRE").
    dataset: str = "counterfact"
    zsre: str = "zsre/zsre_mend_eval_portability_gpt4.json"
    # ROME's copy of MEND's full zsre_mend_eval.json (19,086 records); fetched only into a
    # data.zsre of that file name, never in place of another file.
    zsre_url: Optional[str] = "https://rome.baulab.info/data/dsets/zsre_mend_eval.json"


@dataclass
class StreamConfig:
    on_bad_edit: str = "skip"  # skip | stop
    # null: every finite delta is applied, however large (a disabling edit is what the study
    # measures; NaN/Inf are still refused); a number refuses a delta whose Frobenius norm exceeds it.
    max_delta_norm: Optional[float] = None
    progress: Optional[bool] = None  # null = a tqdm bar only when stderr is a terminal


@dataclass
class CheckpointConfig:
    every: int = 50  # edits between checkpoints; 0 = only at the end (one is always written there)
    keep: int = 2  # complete checkpoints kept on disk; 0 = all
    ledger: bool = True  # per-step deltas in an append-only ledger (low-rank factors where given)
    dense_ledger: bool = False  # also per-step dense deltas of methods without factors (FT-C): big


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING
    sample: SampleConfig = MISSING
    eval: EvalConfig = MISSING
    tracker: TrackerConfig = MISSING
    data: DataConfig = MISSING
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = "auto"  # auto: continue from the run dir's checkpoint | never: refuse one | force
    seed: int = 0
    cache_dir: str = "${oc.env:EDITLAB_CACHE,${oc.env:HOME,.}/.cache/editlab}"
    run_dir: Optional[str] = None  # null = Hydra's output dir


@dataclass
class MethodNode:
    """Keys every method option has besides its hyperparameters."""

    name: str = MISSING
    per_model: Dict[str, Any] = field(default_factory=dict)
    # The row a model without one takes, its layers moved to the same relative depth.
    reference_model: Optional[str] = None
    reference_n_layers: Optional[int] = None  # the reference model's number of blocks
    # Another method whose per_model rows (and reference) this one starts from; see with_inherited.
    inherit: Optional[str] = None
    # Norm-anchor scaling is a hyperparameter of the key–value methods only; every method's node
    # takes the key so that setting it elsewhere gets editlab's error naming them, not Hydra's.
    norm_anchor: Optional[bool] = None


H = TypeVar("H")


def method_node_schema(hparams_cls: Type[Any]) -> Type[Any]:
    """The config-node dataclass of a method: its hyperparameters, all optional and null."""
    hints = typing.get_type_hints(hparams_cls)
    fields = [(f.name, Optional[hints[f.name]], None) for f in dataclasses.fields(hparams_cls)]
    return dataclasses.make_dataclass(f"{hparams_cls.__name__}Node", fields, bases=(MethodNode,))


def relative_layers(layers: List[int], ref_n: int, n: int) -> List[int]:
    """``layers`` of a ``ref_n``-block model moved to the same relative depth in an ``n``-block one.

    A layer is mapped by its centre, round((l + ½)·n/ref_n − ½), which keeps the first and last
    blocks first and last (gpt2-xl's 17 of 48 -> 10 of 30).  A consecutive range keeps its length
    and ends at its mapped last layer (MEMIT's 13..17 of 48 -> 6..10 of 30), shifted up if it
    would start below 0.
    """
    def scale(layer: int) -> int:
        return min(n - 1, max(0, round((layer + 0.5) * n / ref_n - 0.5)))

    if list(layers) != list(range(layers[0], layers[0] + len(layers))):
        return sorted({scale(layer) for layer in layers})
    if len(layers) > n:
        raise ValueError(f"the range has {len(layers)} layers and the model only {n}")
    start = max(0, scale(layers[-1]) - len(layers) + 1)
    return list(range(start, start + len(layers)))


def _reference_row(method_cfg: DictConfig, model_name: str, n_layers: Optional[int], layers_given: bool) -> Any:
    """The row for a model the per_model table lacks: the reference model's, at its relative depth."""
    name, table = method_cfg.get("name"), method_cfg.get("per_model") or {}
    ref, ref_n = method_cfg.get("reference_model"), method_cfg.get("reference_n_layers")
    where = f"method {name}: no per_model row for model {model_name!r}"
    if ref is None or ref_n is None:
        raise ValueError(f"{where}, and conf/method/{name}.yaml names no reference_model/reference_n_layers "
                         "to scale; add a row or set method.layers")
    if ref not in table:
        raise ValueError(f"method {name}: reference_model {ref!r} has no per_model row")
    row = OmegaConf.to_container(table[ref])
    if layers_given or "layers" not in row:
        log.info("%s: the hyperparameters of %s's row, layers as given", where, ref)
        return row
    if n_layers is None:
        raise ValueError(f"{where}; its layers are taken at the relative depth of {ref}'s {row['layers']}, "
                         "which needs the model's layer count (not in its config): add a row or set method.layers")
    try:
        layers = relative_layers(row["layers"], ref_n, n_layers)
    except ValueError as e:
        raise ValueError(f"{where}; {ref}'s layers {row['layers']} do not fit it: {e}. "
                         "Add a row or set method.layers") from e
    log.info("%s: layers %s at the relative depth of %s's %s of %d layers (the model has %d); "
             "other hyperparameters from %s's row", where, layers, ref, row["layers"], ref_n, n_layers, ref)
    return {**row, "layers": layers}


def with_inherited(method_cfg: DictConfig, fields: set[str], _chain: tuple[str, ...] = ()) -> DictConfig:
    """``method_cfg``'s table and reference with those of the method it ``inherit``s merged under.

    The inherited method is read from ``conf/method/<inherit>.yaml`` (and resolved the same way,
    so chains work).  Its rows keep only the keys in ``fields``, the inheriting method's schema: a
    hyperparameter the method does not read must not reach it.  The method's own row for a model
    is merged over the inherited one key by key; ``reference_model``/``reference_n_layers`` are
    the method's own, else inherited.
    """
    parent_name = method_cfg.get("inherit")
    if parent_name is None:
        return method_cfg
    name = method_cfg.get("name")
    chain = (*_chain, name)
    if parent_name in chain:
        raise ValueError(f"method {name}: inherit cycle {' -> '.join((*chain, parent_name))}")
    path = Path(CONF_DIR) / "method" / f"{parent_name}.yaml"
    if not path.is_file():
        raise ValueError(f"method {name}: inherit: {parent_name!r}, but there is no {path}")
    parent = with_inherited(OmegaConf.load(path), fields, chain)
    inherited = OmegaConf.to_container(parent.get("per_model") or OmegaConf.create())
    rows = {model: {k: v for k, v in (row or {}).items() if k in fields} for model, row in inherited.items()}
    reference = {k: method_cfg.get(k) if method_cfg.get(k) is not None else parent.get(k)
                 for k in ("reference_model", "reference_n_layers")}
    table = OmegaConf.merge(rows, method_cfg.get("per_model") or {})
    return OmegaConf.create({"name": name, "per_model": table, **reference})


def resolve_hparams(method_cfg: DictConfig, model_name: str, hparams_cls: Type[H],
                    n_layers: Optional[int] = None) -> H:
    """Effective hyperparameters: dataclass defaults <- per-model row <- explicit overrides.

    The per-model row is the inherited method's row under the method's own (:func:`with_inherited`).
    A model with no row (and no ``default`` row) takes the method's reference row with its layers
    at the same relative depth of the model's ``n_layers`` blocks.
    """
    base = OmegaConf.structured(hparams_cls)
    names = {f.name for f in dataclasses.fields(hparams_cls)}
    node = with_inherited(method_cfg, names)
    table = node.get("per_model") or {}
    overrides = {k: v for k, v in method_cfg.items() if k in names and v is not None}
    if model_name in table or "default" in table:
        row = table.get(model_name, table.get("default"))
    else:
        row = _reference_row(node, model_name, n_layers, "layers" in overrides)
    try:
        merged = OmegaConf.merge(base, row or {}, overrides)
    except Exception as e:  # an unknown key in a per-model row
        raise ValueError(
            f"method {method_cfg.get('name')}: bad per_model row for {model_name!r}: {e}"
        ) from e
    hp = OmegaConf.to_object(merged)
    if hasattr(hp, "validate"):
        hp.validate()
    return hp


def store_schemas(method_hparams: Mapping[str, Type[Any]]) -> None:
    """Register every group's schema in Hydra's ConfigStore, and ``<name>_schema`` for each
    method's hyperparameter class (``editlab.compose.register_configs`` gathers them)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="sample", name="sample_schema", node=SampleConfig)
    cs.store(group="eval", name="eval_schema", node=EvalConfig)
    cs.store(group="tracker", name="tracker_schema", node=TrackerConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    for name, hparams_cls in method_hparams.items():
        cs.store(group="method", name=f"{name}_schema", node=method_node_schema(hparams_cls))
