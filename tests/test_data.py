"""CounterFact loading (both schemas), the paper's sample orders, errors, and the download path."""
import copy
import functools
import http.server
import json
import threading
from pathlib import Path

import pytest
from conftest import compose
from omegaconf import OmegaConf

from editlab.data import EditRequest, build_requests, load_counterfact, load_order, select_requests
from editlab.errors import DataError

ORIGINAL = "counterfact/original_schema_subset/counterfact_original_schema_2715.json"
FLAT = "counterfact/easyedit_splits/counterfact-edit.json"
ORDERS = "counterfact/paper_sample_indices/counterfact_sampled_unique_10_20391.json"


@pytest.fixture(scope="module")
def original(data_root):
    return load_counterfact(data_root / ORIGINAL)


@pytest.fixture(scope="module")
def flat(data_root):
    return load_counterfact(data_root / FLAT)


def test_original_schema_normalises(original):
    assert len(original) == 2715 and all(isinstance(r, EditRequest) for r in original.values())
    r = original[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true, r.relation_id) == (
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French", "P103")
    assert r.rewrite_prompt == "The mother tongue of Danielle Darrieux is"
    assert len(r.paraphrase_prompts) == 2 and len(r.neighborhood_prompts) == 10
    for r in original.values():
        assert r.prompt.count("{}") == 1 and r.subject in r.rewrite_prompt
        assert "\u00a0" not in r.rewrite_prompt + "".join(r.paraphrase_prompts + r.neighborhood_prompts)
        assert r.target_new == r.target_new.strip() and r.target_true == r.target_true.strip()


def test_flat_schema_normalises_to_the_same_requests(original, flat):
    assert len(flat) == 10_000
    r = flat[0]
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French")
    assert r.paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert r.neighborhood_prompts == ("Michel Rocard is a native speaker of",)
    common = set(original) & set(flat)
    assert len(common) > 1000
    for cid in common:
        a, b = original[cid], flat[cid]
        # The flat schema has the subject filled in; recovering the template must give the same request.
        assert (a.rewrite_prompt, a.subject, a.target_new, a.target_true) == (
            b.rewrite_prompt, b.subject, b.target_new, b.target_true), cid
        assert b.neighborhood_prompts[0] in a.neighborhood_prompts


def test_sample_orders_are_the_papers(data_root):
    first = load_order(data_root / ORDERS, 1)
    assert len(first) == 20391 and first[:5] == [14434, 2473, 4093, 16617, 12675]
    tenth = load_order(data_root / ORDERS, 10)
    assert sorted(first) == sorted(tenth) and first != tenth
    with pytest.raises(DataError, match=r"no order for sample=11 \(it holds samples 1..10\)"):
        load_order(data_root / ORDERS, 11)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_sample_k_is_order_k_filtered_to_present_records(data_root, original, k):
    cfg = compose(f"sample={k}", "sample.n_edits=50")
    reqs = build_requests(cfg.data, cfg.sample)
    order = load_order(data_root / ORDERS, k)
    expected = [cid for cid in order if cid in original][:50]
    assert [r.case_id for r in reqs] == expected
    assert len({r.subject.lower() for r in reqs}) == 50


def test_sample_uses_the_flat_file_too(data_root, flat):
    cfg = compose("sample=2", "sample.n_edits=30", f"data.counterfact={FLAT}")
    reqs = build_requests(cfg.data, cfg.sample)
    assert [r.case_id for r in reqs] == [c for c in load_order(data_root / ORDERS, 2) if c in flat][:30]


def _req(cid: int, subject: str) -> EditRequest:
    return EditRequest(case_id=cid, subject=subject, prompt="{} lives in", target_new="Rome", target_true="Oslo")


def test_no_subject_is_edited_twice():
    records = {c: _req(c, s) for c, s in ((1, "Lyon"), (2, "Paris"), (3, "lyon"), (4, "Oslo"), (5, "PARIS"))}
    got = select_requests(records, [9, 1, 2, 3, 4, 5], n_edits=3)
    assert [r.case_id for r in got] == [1, 2, 4]  # 9 is absent, 3 repeats Lyon
    with pytest.raises(DataError, match="only 3 distinct-subject records.*n_edits=4"):
        select_requests(records, [1, 2, 3, 4, 5], n_edits=4)


# -- malformed input ---------------------------------------------------------------------------

def _original_record(cid: int = 7) -> dict:
    return {
        "case_id": cid,
        "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Ann Smith",
                              "target_new": {"str": "English", "id": "Q1"},
                              "target_true": {"str": "French", "id": "Q2"}},
        "paraphrase_prompts": ["Ann Smith speaks"],
        "neighborhood_prompts": ["Bob Jones speaks"],
    }


def _flat_record(cid: int = 7) -> dict:
    return {"case_id": cid, "prompt": "The mother tongue of Ann Smith is", "subject": "Ann Smith",
            "target_new": "English",
            "ground_truth": "French", "rephrase_prompt": "Ann Smith speaks", "locality_prompt": "Bob Jones speaks",
            "locality_ground_truth": "French"}


def _set(rec: dict, path: str, value) -> dict:
    rec = copy.deepcopy(rec)
    *head, last = path.split(".")
    node = rec
    for k in head:
        node = node[k]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return rec


BROKEN = [
    (_original_record, "requested_rewrite.subject", KeyError, "requested_rewrite.subject"),
    (_original_record, "requested_rewrite.target_new.str", 5, "requested_rewrite.target_new.str"),
    (_original_record, "requested_rewrite.target_true", KeyError, "requested_rewrite.target_true.str"),
    (_original_record, "requested_rewrite.prompt", "  ", "requested_rewrite.prompt"),
    (_original_record, "requested_rewrite.prompt", "{} and {} is", "requested_rewrite.prompt"),
    (_original_record, "requested_rewrite.prompt", "Bob speaks", "requested_rewrite.prompt"),
    (_original_record, "paraphrase_prompts", "one string", "paraphrase_prompts"),
    (_original_record, "neighborhood_prompts", ["ok", ""], "neighborhood_prompts"),
    (_flat_record, "ground_truth", KeyError, "ground_truth"),
    (_flat_record, "prompt", "no subject here", "prompt"),
    (_flat_record, "rephrase_prompt", 3, "rephrase_prompt"),
    (_flat_record, "locality_ground_truth", "German", "locality_ground_truth"),
]


@pytest.mark.parametrize("make,path,value,field", BROKEN)
def test_broken_record_names_file_case_id_and_field(tmp_path, make, path, value, field):
    file = tmp_path / "cf.json"
    file.write_text(json.dumps([make(3), _set(make(), path, value)]))
    with pytest.raises(DataError) as e:
        load_counterfact(file)
    msg = str(e.value)
    assert str(file) in msg and "case_id 7" in msg and repr(field) in msg


@pytest.mark.parametrize("records,match", [
    ([{"requested_rewrite": {}}], "record #0: field 'case_id' must be an integer"),
    ([{"case_id": "7", "prompt": "x"}], "record #0: field 'case_id' must be an integer"),
    ([_flat_record(), ["not", "a", "dict"]], "record #1 is not a JSON object"),
    ([_flat_record(), _flat_record()], "case_id 7 appears twice"),
    ([], "non-empty JSON list"),
    ({"case_id": 1}, "non-empty JSON list"),
])
def test_broken_file_structure(tmp_path, records, match):
    file = tmp_path / "cf.json"
    file.write_text(json.dumps(records))
    with pytest.raises(DataError, match=match) as e:
        load_counterfact(file)
    assert str(file) in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    (tmp_path / "cf.json").write_text('[{"case_id": 1,')
    with pytest.raises(DataError, match="cf.json: not valid JSON"):
        load_counterfact(tmp_path / "cf.json")
    (tmp_path / "orders.json").write_text("{")
    with pytest.raises(DataError, match="orders.json: not valid JSON"):
        load_order(tmp_path / "orders.json", 1)
    with pytest.raises(FileNotFoundError, match="EDITLAB_DATA"):
        load_counterfact(tmp_path / "nope.json")


def test_bad_order_file(tmp_path):
    (tmp_path / "orders.json").write_text(json.dumps({"0": [1, "2"]}))
    with pytest.raises(DataError, match="orders.json: order 0 must be a list of integer case_ids"):
        load_order(tmp_path / "orders.json", 1)


# -- download path -----------------------------------------------------------------------------

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A static file server on 127.0.0.1 (any free port) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _served_data(data_root: Path, www: Path, n: int = 8) -> list[int]:
    """A small original-schema file with the first ``n`` records of sample 1, and the real order file."""
    raw = json.loads((data_root / ORIGINAL).read_text())
    by_id = {r["case_id"]: r for r in raw}
    ids = [c for c in load_order(data_root / ORDERS, 1) if c in by_id][:n]
    (www / "counterfact.json").write_text(json.dumps([by_id[c] for c in sorted(ids)]))
    (www / "orders.json").write_bytes((data_root / ORDERS).read_bytes())
    return ids


def test_download_through_the_config(tmp_path, server, data_root):
    www, url = server
    ids = _served_data(data_root, www)
    root = tmp_path / "data"
    overrides = [f"data.root={root}", "data.counterfact=counterfact/counterfact.json",
                 f"data.counterfact_url={url}/counterfact.json", f"data.sample_orders_url={url}/orders.json",
                 "sample.n_edits=5"]
    cfg = compose(*overrides)
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        build_requests(cfg.data, cfg.sample)
    assert not root.exists() or not any(root.rglob("*.json"))

    cfg = compose(*overrides, "data.download=true")
    reqs = build_requests(cfg.data, cfg.sample)
    assert [r.case_id for r in reqs] == ids[:5]
    assert (root / "counterfact/counterfact.json").read_bytes() == (www / "counterfact.json").read_bytes()
    assert (root / ORDERS).read_bytes() == (www / "orders.json").read_bytes()

    (www / "counterfact.json").unlink()  # a present file is used as is, never fetched again
    assert [r.case_id for r in build_requests(cfg.data, cfg.sample)] == ids[:5]


def test_failed_download_leaves_no_file(tmp_path, server):
    from urllib.error import HTTPError

    from editlab.data import download

    _, url = server
    dest = tmp_path / "out" / "counterfact.json"
    with pytest.raises(HTTPError):
        download(f"{url}/missing.json", dest)
    assert list(dest.parent.iterdir()) == []


def test_default_urls_are_the_public_ones():
    d = OmegaConf.to_object(compose().data)
    assert d.counterfact_url == "https://rome.baulab.info/data/dsets/counterfact.json"
    assert d.sample_orders_url.endswith("gradual-catastrophic-forgetting/"
                                        "32eaa57ca105ea65a4f3bd86eeb7f4234f173ec8/counterfact_sampled_unique_10_20391.json")


def test_the_reduced_schema_split_feeds_streams_past_9000_edits(data_root):
    cfg = compose("data=counterfact_edit", "sample=3", "sample.n_edits=9000")
    reqs = build_requests(cfg.data, cfg.sample)
    assert len(reqs) == 9000 and len({r.subject.lower() for r in reqs}) == 9000
    assert all(len(r.paraphrase_prompts) == 1 and len(r.neighborhood_prompts) == 1 for r in reqs[:100])
    assert not any(r.generation_prompts for r in reqs[:100])  # what the reduced schema lacks
    with pytest.raises(DataError, match="only 9307 distinct-subject records"):
        build_requests(cfg.data, compose("data=counterfact_edit", "sample.n_edits=10000").sample)


def test_a_missing_data_file_names_itself_and_the_download_switch(tmp_path):
    cfg = compose("data=counterfact_edit", f"data.root={tmp_path}", "data.download=true")
    with pytest.raises(FileNotFoundError, match=r"counterfact-edit.json does not exist.*data.download=true cannot"):
        build_requests(cfg.data, cfg.sample)
