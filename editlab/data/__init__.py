"""Edit requests (CounterFact with the paper's sample orders, or zsRE) and other data files."""
from pathlib import Path
from urllib.parse import urlparse

from editlab.data.counterfact import load_counterfact
from editlab.data.download import download, ensure_file
from editlab.data.requests import EditRequest
from editlab.data.samples import load_order, select_requests
from editlab.data.zsre import load_zsre, select_zsre, zsre_order

DATASETS = ("counterfact", "zsre")


def zsre_file(data_cfg, root: Path) -> Path:
    """``data.zsre`` under ``root``; downloaded from ``data.zsre_url`` only when the URL serves a
    file of the same name (the full set is never saved under the subset's name)."""
    path = root / data_cfg.zsre
    url = data_cfg.zsre_url
    served = Path(urlparse(url).path).name if url else None
    if path.exists() or served is None or served == path.name:
        return ensure_file(path, url, data_cfg.download)
    raise FileNotFoundError(
        f"{path} does not exist; set EDITLAB_DATA/data.root to the data folder. data.download=true cannot "
        f"fetch it: data.zsre_url serves {served} (pass data.zsre={Path(data_cfg.zsre).parent / served} for that)")


def build_requests(data_cfg, sample_cfg) -> list[EditRequest]:
    """The edit stream of a run: ``sample.index``'s order over the configured dataset's file."""
    root = Path(data_cfg.root).expanduser()
    if data_cfg.dataset == "zsre":
        return select_zsre(load_zsre(zsre_file(data_cfg, root)), sample_cfg.index, sample_cfg.n_edits)
    if data_cfg.dataset != "counterfact":
        raise ValueError(f"data.dataset={data_cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    cf = ensure_file(root / data_cfg.counterfact, data_cfg.counterfact_url, data_cfg.download)
    records = load_counterfact(cf)
    orders = ensure_file(root / data_cfg.sample_orders, data_cfg.sample_orders_url, data_cfg.download)
    order = load_order(orders, sample_cfg.index)
    return select_requests(records, order, sample_cfg.n_edits)


__all__ = ["DATASETS", "EditRequest", "build_requests", "download", "ensure_file", "load_counterfact",
           "load_order", "load_zsre", "select_requests", "select_zsre", "zsre_file", "zsre_order"]
