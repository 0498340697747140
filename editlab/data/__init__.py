"""CounterFact requests, the paper's sample orders, and other data files."""
from pathlib import Path

from editlab.data.counterfact import load_counterfact
from editlab.data.download import download, ensure_file
from editlab.data.requests import EditRequest
from editlab.data.samples import load_order, select_requests


def build_requests(data_cfg, sample_cfg) -> list[EditRequest]:
    """The edit stream of a run: ``sample.index``'s order over the configured CounterFact file."""
    root = Path(data_cfg.root).expanduser()
    cf = ensure_file(root / data_cfg.counterfact, data_cfg.counterfact_url, data_cfg.download)
    records = load_counterfact(cf)
    orders = ensure_file(root / data_cfg.sample_orders, data_cfg.sample_orders_url, data_cfg.download)
    order = load_order(orders, sample_cfg.index)
    return select_requests(records, order, sample_cfg.n_edits)


__all__ = ["EditRequest", "build_requests", "download", "ensure_file", "load_counterfact",
           "load_order", "select_requests"]
