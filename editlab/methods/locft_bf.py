"""LocFT-BF (Yang et al. 2025, "Fine-tuning Done Right in Model Editing"; ICT-STAR/LocFT).

Fine-tuning of one located MLP output matrix, breadth-first: a step runs ``epochs`` epochs over
all of its edits, each epoch over shuffled mini-batches of ``batch_size`` with one Adam step per
mini-batch, instead of optimising one edit to convergence before the next (FT-C's depth-first
loop).  The loss is the teacher-forced NLL of the target tokens with EOS appended (mean per
edit, then over the mini-batch).  As the reference: a mini-batch whose loss is already below
``early_stop_loss`` takes no step, and an epoch whose mean loss is below it ends the step.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Sequence

import torch

from editlab.data.requests import EditRequest
from editlab.deltas import Delta
from editlab.evaluate.scoring import Encoded, encode, teacher_forced_nll
from editlab.methods.base import Editor
from editlab.models.loading import LoadedModel
from editlab.registry import register_method


@dataclass
class LocFTBFHparams:
    layers: List[int] = field(default_factory=lambda: [22])  # exactly one located matrix
    lr: float = 5e-4
    epochs: int = 25
    batch_size: int = 100
    weight_decay: float = 0.0
    early_stop_loss: float = 1e-2
    append_eos: bool = True

    def validate(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"locft_bf tunes exactly one MLP matrix, got layers={self.layers}")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("locft_bf needs lr > 0, epochs >= 1 and batch_size >= 1")


@register_method("locft_bf", hparams=LocFTBFHparams)
class LocFTBFEditor(Editor):
    def __init__(self, hparams, ctx):
        super().__init__(hparams, ctx)
        self.n_steps = 0  # steps edited so far: seeds each step's shuffles (resumable)

    def encode(self, lm: LoadedModel, req: EditRequest) -> Encoded:
        enc = encode(lm.tok, req.rewrite_prompt, req.target_new)
        eos = lm.tok.eos_token_id
        if self.hp.append_eos:
            if eos is None:
                raise ValueError("locft_bf.append_eos needs a tokenizer with an EOS token")
            return Encoded(enc.prompt, enc.target + (eos,))
        return enc

    def loss(self, lm: LoadedModel, encs: Sequence[Encoded]) -> torch.Tensor:
        return teacher_forced_nll(lm.model, encs, lm.tok.pad_token_id)

    def apply(self, lm: LoadedModel, requests: Sequence[EditRequest]) -> Delta:
        hp = self.hp
        name = lm.table.mlp_out_weight_name(hp.layers[0])
        w = lm.table.mlp_out_weight(hp.layers[0])
        start = w.detach().clone()
        encs = [self.encode(lm, r) for r in requests]
        order = list(range(len(encs)))
        rng = random.Random(self.ctx.seed * 1_000_003 + self.n_steps)
        opt = torch.optim.Adam([w], lr=hp.lr, weight_decay=hp.weight_decay)
        w.requires_grad_(True)
        epochs = opt_steps = 0
        epoch_loss = float("nan")
        try:
            for _ in range(hp.epochs):
                rng.shuffle(order)
                total = 0.0
                for s in range(0, len(order), hp.batch_size):
                    batch = [encs[i] for i in order[s: s + hp.batch_size]]
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(lm, batch)
                    total += float(loss.detach()) * len(batch)
                    if float(loss.detach()) >= hp.early_stop_loss:
                        loss.backward()
                        opt.step()
                        opt_steps += 1
                epochs += 1
                epoch_loss = total / len(encs)
                if epoch_loss < hp.early_stop_loss:
                    break
        finally:
            with torch.no_grad():
                delta = w.detach() - start
                w.copy_(start)
            w.requires_grad_(False)
        self.n_steps += 1
        return Delta(params={name: delta}, info={"loss": epoch_loss, "epochs": epochs, "opt_steps": opt_steps})

    def state_dict(self):
        return {"n_steps": self.n_steps}

    def load_state_dict(self, state):
        self.n_steps = int(state.get("n_steps", 0))
