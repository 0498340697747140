"""Download path for users with internet (CounterFact's public URL)."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def download(url: str, dest: str | Path, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest`` atomically (a partial download never looks complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        shutil.move(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def ensure_file(path: Path, url: str | None, allow_download: bool) -> Path:
    if path.exists():
        return path
    if allow_download and url:
        return download(url, path)
    fetch = ("or pass data.download=true to fetch it" if url else
             "data.download=true cannot fetch it: no download URL is configured for it")
    raise FileNotFoundError(f"{path} does not exist; set EDITLAB_DATA/data.root to the data folder, {fetch}")
