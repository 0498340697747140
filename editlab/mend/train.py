"""``editlab train-mend model=<name> [mend.<key>=<value> ...]``: train a MEND editor.

Each step edits ``edits_per_step`` CounterFact training records: the editor turns the gradient of
``-log p(target_new | rewrite prompt)`` at the unedited model into an update of the configured MLP
matrices; the loss is ``c_edit * L_edit + L_loc`` with ``L_edit`` the NLL of ``target_new`` after
the paraphrase prompts of the edited model and ``L_loc`` the KL divergence from the unedited to
the edited next-token distributions on unrelated facts (the record's neighbourhood prompt and
another record's rewrite prompt, each followed by its true object).  As EasyEdit's MEND trainer,
the KL is read only where the unrelated fact's answer tokens are predicted: averaged over every
position of the prompt it is dominated by positions no edit is meant to touch, and neighbourhood
success collapsed (SmolLM2, 300 steps: NS 0.75 -> 0.06 on 50 held-out single edits).  Adam;
periodic validation on held-out records; the editor is checkpointed to ``mend.out_dir`` and
training resumes from there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from editlab.args import UsageError, key_values
from editlab.data.requests import EditRequest
from editlab.evaluate.scoring import Encoded, encode, mean_per_pair, target_logits, target_logprobs, teacher_forced_nll
from editlab.mend.data import Excluded, evaluated_records, training_records
from editlab.mend.factor import gradient_factors, with_updates
from editlab.mend.net import MENDNet, spec_from_model
from editlab.mend.store import load_editor, save_editor
from editlab.models.loading import LoadedModel, layer_count

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out_dir: Optional[str] = None  # null = outputs/mend/<model>
    layers: Optional[List[int]] = None  # null = method=mend's per-model layers
    train_file: str = "counterfact/easyedit_splits/counterfact-train.json"
    val_file: str = "counterfact/easyedit_splits/counterfact-val.json"
    exclude_n_edits: Optional[int] = None  # first n of every sample order excluded; null = whole orders
    steps: int = 2000
    edits_per_step: int = 1
    lr: float = 1e-4  # Adam on the network
    # Adam on the per-layer step sizes.  MEND used 1e-4 (= the initial step size, so alpha can double
    # per step); on SmolLM2 that overshoots within 6 steps (NS 0.67 -> 0.07), hence 10x smaller.
    lr_lr: float = 1e-5
    c_edit: float = 0.1
    grad_clip: float = 100.0
    rank: int = 192
    depth: int = 2
    init_lr: float = 1e-4  # initial per-layer step size alpha
    val_every: int = 100
    n_val: int = 20
    save_every: int = 100
    seed: int = 0
    resume: bool = True
    progress: Optional[bool] = None  # null = a bar only on a terminal

    def validate(self) -> None:
        if self.steps < 1 or self.edits_per_step < 1 or self.n_val < 0:
            raise ValueError("mend.steps and mend.edits_per_step must be >= 1, mend.n_val >= 0")
        if self.val_every < 1 or self.save_every < 1 or not self.c_edit > 0:
            raise ValueError("mend.val_every and mend.save_every must be >= 1, mend.c_edit > 0")


def locality_facts(tok, records: Sequence[EditRequest], unrelated: Sequence[EditRequest]) -> list[Encoded]:
    """(prompt, true object) pairs an edit of ``records`` must leave alone: each record's first
    neighbourhood prompt and each unrelated record's rewrite prompt."""
    return ([encode(tok, r.neighborhood_prompts[0], r.target_true) for r in records]
            + [encode(tok, r.rewrite_prompt, r.target_true) for r in unrelated])


def answer_logp(lm: LoadedModel, facts: Sequence[Encoded]) -> torch.Tensor:
    """Log-softmax over the vocabulary where each fact's answer tokens are predicted: [n_tokens, vocab]."""
    logits, _, _ = target_logits(lm.model, facts, lm.tok.pad_token_id)
    return torch.log_softmax(logits, dim=-1)


def kl_from(base_logp: torch.Tensor, edited_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(base || edited)."""
    return (base_logp.exp() * (base_logp - edited_logp)).sum(-1).mean()


class Trainer:
    def __init__(self, lm: LoadedModel, net: MENDNet, cfg: TrainConfig, train: list[EditRequest],
                 val: list[EditRequest]):
        self.lm, self.net, self.cfg, self.train, self.val = lm, net, cfg, train, val
        self.layers = list(net.spec.layers)
        body = [p for n, p in net.named_parameters() if n != "lrs"]
        self.opt = torch.optim.Adam([{"params": body, "lr": cfg.lr}, {"params": [net.lrs], "lr": cfg.lr_lr}])
        self.rng = random.Random(cfg.seed)
        self.step = 0

    def losses(self, batch: Sequence[EditRequest], unrelated: Sequence[EditRequest]) -> dict[str, torch.Tensor]:
        tok = self.lm.tok
        encs = [encode(tok, r.rewrite_prompt, r.target_new) for r in batch]
        pre, factors = gradient_factors(self.lm, self.layers, encs)
        updates = self.net.updates(factors)
        outer = [encode(tok, p, r.target_new) for r in batch for p in r.paraphrase_prompts]
        loc = locality_facts(tok, batch, unrelated)
        with torch.no_grad():
            base = answer_logp(self.lm, loc)
        with with_updates(self.lm.table, updates):
            l_edit = teacher_forced_nll(self.lm.model, outer, tok.pad_token_id)
            l_loc = kl_from(base, answer_logp(self.lm, loc))
        return {"loss": self.cfg.c_edit * l_edit + l_loc, "edit": l_edit, "loc": l_loc,
                "pre_edit": torch.tensor(pre)}

    def train_step(self, batch: Sequence[EditRequest], unrelated: Sequence[EditRequest]) -> dict[str, float]:
        self.net.train()
        t0 = time.perf_counter()
        out = self.losses(batch, unrelated)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        row = {k: float(v.detach()) for k, v in out.items()}
        row.update(step=self.step, grad_norm=float(gnorm), alpha=[float(a) for a in self.net.lrs.detach()],
                   seconds=time.perf_counter() - t0)
        return row

    def sample_batch(self) -> tuple[list[EditRequest], list[EditRequest]]:
        picks = self.rng.sample(self.train, 2 * self.cfg.edits_per_step)
        return picks[: self.cfg.edits_per_step], picks[self.cfg.edits_per_step:]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Single edits of held-out records: efficacy, paraphrase and neighbourhood success (as the
        stream scores them, on the first paraphrase and neighbourhood prompt), locality KL, edit NLL."""
        self.net.eval()
        tok, n = self.lm.tok, len(self.val)
        sums = {"val_es": 0.0, "val_ps": 0.0, "val_ns": 0.0, "val_loc": 0.0, "val_edit": 0.0}
        for i, r in enumerate(self.val):
            _, factors = gradient_factors(self.lm, self.layers, [encode(tok, r.rewrite_prompt, r.target_new)])
            updates = self.net.updates(factors)
            other = self.val[(i + 1) % n]
            loc = locality_facts(tok, [r], [other])
            base = answer_logp(self.lm, loc)
            para, neighbour = r.paraphrase_prompts[0], r.neighborhood_prompts[0]
            pairs = [(p, t) for p in (r.rewrite_prompt, para, neighbour) for t in (r.target_new, r.target_true)]
            encs = [encode(tok, p, t) for p, t in pairs]
            with with_updates(self.lm.table, updates):
                logp, _, owner = target_logprobs(self.lm.model, encs, tok.pad_token_id)
                rw_new, rw_true, para_new, para_true, nb_new, nb_true = mean_per_pair(-logp, owner, len(encs)).tolist()
                sums["val_loc"] += float(kl_from(base, answer_logp(self.lm, loc)))
            sums["val_es"] += float(rw_new < rw_true)
            sums["val_ps"] += float(para_new < para_true)
            sums["val_ns"] += float(nb_true < nb_new)
            sums["val_edit"] += para_new
        return {k: v / max(n, 1) for k, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "step": self.step, "rng": self.rng.getstate(),
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])


def save(out_dir: Path, trainer: Trainer, meta: dict[str, Any]) -> str:
    digest = save_editor(out_dir, trainer.net, {**meta, "step": trainer.step})
    tmp = out_dir / "train_state.pt.tmp"
    torch.save(trainer.state_dict(), tmp)
    tmp.replace(out_dir / "train_state.pt")
    return digest


def try_resume(out_dir: Path, trainer: Trainer, meta: dict[str, Any]) -> None:
    """Continue from ``out_dir``'s checkpoint if it was made by the same setup; refuse a foreign one."""
    cfg_file, state_file = out_dir / "config.json", out_dir / "train_state.pt"
    if not state_file.exists():
        return
    net, config, _ = load_editor(out_dir)
    theirs = {k: config.get(k) for k in ("model_id", "layers", "spec")}
    ours = {"model_id": meta["model_id"], "layers": meta["layers"], "spec": dataclasses.asdict(trainer.net.spec)}
    if json.loads(json.dumps(theirs)) != json.loads(json.dumps(ours)):
        raise ValueError(f"{cfg_file}: this checkpoint was trained for {theirs}, not {ours}; "
                         "use another mend.out_dir or mend.resume=false")
    trainer.net.load_state_dict(net.state_dict())
    trainer.load_state_dict(torch.load(state_file, weights_only=False))
    log.info("resuming MEND training from step %d in %s", trainer.step, out_dir)


def read_history(file: Path, upto: int) -> list[dict]:
    if not file.exists():
        return []
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def plot_curve(history: list[dict], file: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    tr = [r for r in history if "edit" in r]
    va = [r for r in history if "val_es" in r]
    for ax, key, title in ((ax1, "edit", "edit NLL (paraphrase)"), (ax2, "loc", "locality KL")):
        if tr:
            ax.plot([r["step"] for r in tr], [r[key] for r in tr], lw=0.5, alpha=0.4, label="train")
        if va:
            ax.plot([r["step"] for r in va], [r[f"val_{key}"] for r in va], "o-", label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    for key, label in (("val_es", "efficacy"), ("val_ps", "paraphrase"), ("val_ns", "neighbourhood")):
        points = [(r["step"], r[key]) for r in va if key in r]  # val_ns: absent from older histories
        if points:
            ax3.plot(*zip(*points), "o-", label=label)
    ax3.set_ylim(-0.05, 1.05)
    ax3.set_title("validation success")
    ax3.set_xlabel("step")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def train(lm: LoadedModel, model_name: str, cfg: TrainConfig, layers: Sequence[int], data_root: Path,
          excluded: Excluded, out_dir: Path) -> dict[str, Any]:
    cfg.validate()
    torch.manual_seed(cfg.seed)
    train_set = training_records(data_root / cfg.train_file, excluded)
    val_set = training_records(data_root / cfg.val_file, excluded)
    random.Random(cfg.seed).shuffle(val_set)
    val_set = val_set[: cfg.n_val]
    net = MENDNet(spec_from_model(lm.table, layers, cfg.rank, cfg.depth, cfg.init_lr)).to(lm.device)
    trainer = Trainer(lm, net, cfg, train_set, val_set)
    meta = {"model": model_name, "model_id": lm.model_id, "layers": list(layers),
            "param_names": [lm.table.mlp_out_weight_name(l) for l in layers], "train": dataclasses.asdict(cfg),
            "excluded": {"source": excluded.source, "case_ids": len(excluded.case_ids)}}
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        try_resume(out_dir, trainer, meta)
    hist_file = out_dir / "history.jsonl"
    # Rows past the checkpoint are redone; a fresh start (resume off or no checkpoint) drops them all.
    history = read_history(hist_file, trainer.step) if trainer.step else []
    if trainer.step == 0 and val_set:
        history.append({"step": 0, **trainer.validate()})
    hist_file.write_text("".join(json.dumps(r) + "\n" for r in history))
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train-mend",
               disable=None if cfg.progress is None else not cfg.progress)
    digest = None
    with open(hist_file, "a") as hist:
        while trainer.step < cfg.steps:
            row = trainer.train_step(*trainer.sample_batch())
            if val_set and (trainer.step % cfg.val_every == 0 or trainer.step == cfg.steps):
                row.update(trainer.validate())
                log.info("step %d: %s", trainer.step, {k: round(v, 4) for k, v in row.items() if k.startswith("val")})
            history.append(row)
            hist.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(edit=f"{row['edit']:.2f}", loc=f"{row['loc']:.3f}")
            if trainer.step % cfg.save_every == 0 or trainer.step == cfg.steps:
                hist.flush()
                digest = save(out_dir, trainer, meta)
    bar.close()
    if digest is None:  # nothing left to train: the checkpoint is already complete
        digest = save(out_dir, trainer, meta)
    plot_curve(history, out_dir / "curve.png")
    return {"out_dir": str(out_dir), "sha256": digest, "step": trainer.step,
            **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")}}


def parse_args(argv: Sequence[str]) -> tuple[list[str], TrainConfig]:
    """``mend.<key>=<value>`` go to :class:`TrainConfig` (OmegaConf reads them by its field types:
    optional lists and numbers); everything else is a Hydra override of the run config."""
    pairs = key_values(argv)
    mend = [f"{k[len('mend.'):]}={v}" for k, v in pairs if k.startswith("mend.")]
    overrides = [f"{k}={v}" for k, v in pairs if not k.startswith("mend.")]
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(mend)))
    except Exception as e:  # an unknown mend.* key or a bad value
        raise UsageError(f"bad mend.* argument: {e}") from e
    return overrides, cfg


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    from hydra import compose, initialize_config_dir

    from editlab.compose import normalize_overrides, register_configs
    from editlab.config import CONF_DIR, resolve_hparams
    from editlab.methods.mend import MENDHparams
    from editlab.models import load_model

    try:
        overrides, cfg = parse_args(argv)
        register_configs()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            run_cfg = compose(config_name="config",
                              overrides=normalize_overrides(["method=mend", "tracker=none", "eval=none", *overrides]))
        # A model with no MEND row takes the reference row's layers at its depth, from its layer count.
        n_layers = layer_count(run_cfg.model, run_cfg.cache_dir, seed=run_cfg.seed)
        layers = cfg.layers or resolve_hparams(run_cfg.method, run_cfg.model.name, MENDHparams, n_layers).layers
        data_root = Path(run_cfg.data.root).expanduser()
        excluded = evaluated_records(data_root / run_cfg.data.counterfact, data_root / run_cfg.data.sample_orders,
                                     cfg.exclude_n_edits)
        lm = load_model(run_cfg.model, run_cfg.cache_dir, seed=run_cfg.seed)
        out_dir = Path(cfg.out_dir or f"outputs/mend/{run_cfg.model.name}")
        summary = train(lm, run_cfg.model.name, cfg, layers, data_root, excluded, out_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"editlab train-mend: {e}", file=sys.stderr)
        return 2
    print(f"editlab train-mend: editor at {summary['out_dir']} (sha256 {summary['sha256']}); {json.dumps(summary)}")
    return 0
