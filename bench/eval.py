"""Evaluation speed on SmolLM2-135M (issue 4).

1. One downstream round (4 GLUE tasks x n examples, generation + label-word likelihood) with the
   few-shot prefix's KV cache computed once per task vs every prompt run whole; the predictions
   must agree.
2. One forgetting round over ``edits`` earlier facts (rewrite + paraphrase prompts), batched
   across facts vs one fact at a time; the numbers must agree.
3. ``--only scale --sizes 1000,5000``: a forgetting round (``ForgetTracker.round``) over that many
   earlier edits of ``--data`` against a plain padded forward of the same token sequences (full
   logits, nothing scored), in prompts per second.

Defaults are the issue's sizes (4 x 200, 500 edits) on a GPU and smaller ones on a CPU, where
the full uncached round takes many minutes: ``python -m bench.eval --n 200 --edits 500``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from editlab.compose import register_configs

GLUE = "glue/paper_subsets/gradual-catastrophic-forgetting"


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from editlab.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_downstream(lm, data_root: Path, n: int, batch_size: int) -> None:
    from editlab.evaluate.downstream import DownstreamEval

    de = DownstreamEval.from_dir(lm, data_root / GLUE, ["sst2", "mrpc", "rte", "cola"], n, batch_size=batch_size)
    tokens = {tt.task.name: (len(tt.prefix), sum(map(len, tt.suffixes)) / len(tt.suffixes)) for tt in de.tasks}
    print(f"downstream: 4 tasks x {n} examples, batch {batch_size}, generate {de.gen_tokens} tokens + likelihood; "
          "(prefix tokens, mean suffix tokens): " + ", ".join(f"{k} {p}/{s:.0f}" for k, (p, s) in tokens.items()))
    cached, t_c, cpu_c = _timed(lambda: [de.predict(tt, use_cache=True) for tt in de.tasks])
    plain, t_u, cpu_u = _timed(lambda: [de.predict(tt, use_cache=False) for tt in de.tasks])
    same = all(a.texts == b.texts and a.gen == b.gen and a.lik == b.lik for a, b in zip(cached, plain))
    diff = max(float((a.word_logprobs - b.word_logprobs).abs().max()) for a, b in zip(cached, plain))
    print(f"  prefix cache : {t_c:8.1f} s wall  {cpu_c:8.1f} s cpu")
    print(f"  no cache     : {t_u:8.1f} s wall  {cpu_u:8.1f} s cpu")
    print(f"  speed-up {t_u / t_c:.2f}x wall, {cpu_u / cpu_c:.2f}x cpu; same predictions: {same}; "
          f"max |label-word logprob diff| {diff:.2e}")
    f1 = de.round()
    print("  F1 (unedited): " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in f1.items() if "mean" in k))


def bench_forgetting(lm, data_root: Path, edits: int, batch_size: int) -> None:
    from editlab.data import build_requests
    from editlab.evaluate.forgetting import ForgetTracker, fact_scores

    cfg = _compose(f"sample.n_edits={edits}")
    reqs = build_requests(cfg.data, cfg.sample)
    tr = ForgetTracker(paraphrase=True, batch_size=batch_size)
    tr.made = fact_scores(lm.model, lm.tok, reqs, True, batch_size)
    tr.forget_at = [None] * len(reqs)
    n_prompts = sum(1 + len(r.paraphrase_prompts) for r in reqs)
    print(f"forgetting: {len(reqs)} earlier edits, {n_prompts} prompts x 2 targets, batch {batch_size}")
    batched, t_b, cpu_b = _timed(lambda: fact_scores(lm.model, lm.tok, reqs, True, batch_size))
    alone, t_a, cpu_a = _timed(lambda: [fact_scores(lm.model, lm.tok, [r], True)[0] for r in reqs])
    print(f"  batched      : {t_b:8.1f} s wall  {cpu_b:8.1f} s cpu")
    print(f"  one by one   : {t_a:8.1f} s wall  {cpu_a:8.1f} s cpu")
    print(f"  speed-up {t_a / t_b:.2f}x wall, {cpu_a / cpu_b:.2f}x cpu; same numbers: {batched == alone}")
    m = tr.round(lm.model, lm.tok, reqs, now=len(reqs))
    print(f"  round metrics (unedited model): eligible {m['forget/eligible']}, retention {m['forget/retention']:.3f}, "
          f"para_retention {m['forget/para_retention']:.3f}")


def plain_forward(model, tok, pairs, batch_size: int) -> None:
    """The same (prompt, target) token sequences, in the same length-sorted padded batches, through
    the model with full logits and no scoring: what a round costs at the least."""
    from editlab.evaluate.scoring import encode

    seqs = sorted((list(e.prompt + e.target) for e in (encode(tok, p, t) for p, t in pairs)), key=len)
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in chunk])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
            model(input_ids=ids, attention_mask=mask)


def bench_forgetting_scale(lm, sizes: list[int], data: str, batch_size: int) -> None:
    from editlab.data import build_requests
    from editlab.evaluate.forgetting import FactScore, ForgetTracker

    for n in sizes:
        cfg = _compose(f"data={data}", f"sample.n_edits={n}")
        reqs = build_requests(cfg.data, cfg.sample)
        tr = ForgetTracker(paraphrase=True, batch_size=batch_size)
        tr.made = [FactScore(True, [True] * len(r.paraphrase_prompts)) for r in reqs]  # as if all held
        tr.forget_at = [None] * len(reqs)
        prompts = [p for r in reqs for p in (r.rewrite_prompt, *r.paraphrase_prompts)]
        pairs = [(p, t) for r in reqs for p in (r.rewrite_prompt, *r.paraphrase_prompts)
                 for t in (r.target_new, r.target_true)]
        _, t_round, _ = _timed(tr.round, lm.model, lm.tok, reqs, now=n)
        _, t_plain, _ = _timed(plain_forward, lm.model, lm.tok, pairs, batch_size)
        print(f"forgetting round over {n} earlier edits (data={data}): {len(prompts)} prompts x 2 targets, "
              f"batch {batch_size}, load average {os.getloadavg()[0]:.1f}")
        print(f"  round         : {t_round:8.1f} s  {len(prompts) / t_round:7.1f} prompts/s")
        print(f"  plain forward : {t_plain:8.1f} s  {len(prompts) / t_plain:7.1f} prompts/s  "
              f"(round / plain {t_round / t_plain:.2f})")


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200 if gpu else 10, help="examples per GLUE task")
    ap.add_argument("--edits", type=int, default=500 if gpu else 100, help="earlier edits re-scored")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--only", choices=["downstream", "forgetting", "scale"])
    ap.add_argument("--sizes", default="1000,5000", help="--only scale: earlier edits per round")
    ap.add_argument("--data", default="counterfact_edit", help="--only scale: the data option the edits come from")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 avoids spin-wait stalls on an oversubscribed CPU")
    args = ap.parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("EDITLAB_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    register_configs()
    from editlab.models import load_model

    cfg = _compose("model=smollm2-135m")
    lm = load_model(cfg.model, cfg.cache_dir)
    data_root = Path(cfg.data.root).expanduser()
    print(f"model {lm.model_id} on {lm.device}, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.only == "scale":
        bench_forgetting_scale(lm, [int(x) for x in args.sizes.split(",")], args.data, args.batch_size)
        return
    if args.only != "forgetting":
        bench_downstream(lm, data_root, args.n, args.batch_size)
    if args.only != "downstream":
        bench_forgetting(lm, data_root, args.edits, args.batch_size)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
