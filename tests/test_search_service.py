"""`reid serve`: the gallery-search service on a real Ray Serve deployment (started by the real
command, on loopback), answering over HTTP, refusing bad requests with HTTP 400 and going on, and
its page driven in headless Chromium.

The gallery is the tiny Market tree's test folder, embedded with ``reid embed``'s function and
written as an exact index (``write_index``, not the Ray Data builder), so every ranking the service
gives is checked against the plain dot products of those embeddings.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests
import torch

from reid_platform.cli import main
from reid_platform.cluster.local import free_port
from reid_platform.errors import ConfigError
from reid_platform.model.artifact import save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.model.inference import embed_images
from reid_platform.search.index import ModelStamp, write_index
from reid_platform.search.model import resolve_model
from reid_platform.search.service import parse_query
from reid_platform.search.sources import list_entries
from tests import REPO
from tests.services import wait_for

REID = str(Path(sys.executable).parent / "reid")
PRE = Preprocessing(height=64, width=32)
DIM = 16
FIRST_TIME = 1.7e9  # the gallery's crops are a minute apart from here


def tiny_model(seed: int, embedding_dim: int = DIM) -> ReIDNet:
    torch.manual_seed(seed)
    return ReIDNet(ModelConfig(arch="resnet18", embedding_dim=embedding_dim), PRE).eval()


class Gallery:
    """The index on disk, the model folder it was built with, and what the oracle needs."""

    def __init__(self, root: Path, market: Path):
        model = tiny_model(seed=0)
        self.model_dir = save_model_dir(model, PRE, root / "model")
        entries = list_entries(str(market / "bounding_box_test"))
        self.paths = entries.column("path").to_pylist()
        self.cameras = entries.column("camera").to_numpy()
        self.times = FIRST_TIME + 60.0 * np.arange(len(self.paths))
        entries = entries.set_column(entries.schema.get_field_index("timestamp"), "timestamp", pa.array(self.times))
        self.embeddings = embed_images(model, PRE, [Path(p) for p in self.paths])
        self.stamp = resolve_model(str(self.model_dir), None, flip=False).stamp  # as `reid index build` stamps it
        self.index_dir = root / "index"
        write_index(self.index_dir, self.embeddings, entries, self.stamp, kind="flat")

    def ranking(self, query: np.ndarray, top_k: int, keep: np.ndarray | None = None) -> list[int]:
        """The oracle: gallery rows by falling dot product with ``query`` (only ``keep``'s)."""
        scores = self.embeddings.astype(np.float64) @ query.astype(np.float64)
        rows = np.flatnonzero(keep if keep is not None else np.ones(len(scores), bool))
        return rows[np.argsort(-scores[rows], kind="stable")][:top_k].tolist()


@pytest.fixture(scope="module")
def gallery(tiny_market, tmp_path_factory) -> Gallery:
    return Gallery(tmp_path_factory.mktemp("gallery"), tiny_market)


class Service:
    """`reid serve INDEX_DIR` on a free loopback port, in its own session; stopped as a process manager
    stops it (SIGTERM), which shuts Serve and its Ray cluster down."""

    def __init__(self, index_dir: Path, *arguments: str):
        self.url = f"http://127.0.0.1:{free_port()}/"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the service runs
        self.process = subprocess.Popen(
            [REID, "serve", str(index_dir), "--port", self.url.rsplit(":", 1)[1].strip("/"), *arguments],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, text=True,
        )  # fmt: skip

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"reid serve ended ({self.process.returncode}):\n{self.output()[-3000:]}")
        try:
            return requests.get(self.url + "healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def search(self, **fields) -> requests.Response:
        image = fields.pop("image_file", None)
        if image is not None:
            return requests.post(self.url + "search", files={"image": image}, data=fields, timeout=60)
        return requests.post(self.url + "search", json=fields, timeout=60)

    def stop(self) -> int:
        """Its exit status (0: it shut down cleanly)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its Ray cluster
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def service(gallery) -> Service:
    running = Service(gallery.index_dir, "--max-batch-size", "8")
    try:
        wait_for(running.up, "reid serve to answer /healthz", timeout=240)
        yield running
    finally:
        status = running.stop()
    assert status == 0, f"reid serve did not shut down cleanly on SIGTERM (exit status {status})"


def rows(reply: requests.Response) -> list[int]:
    assert reply.status_code == 200, reply.text
    return [hit["row"] for hit in reply.json()["hits"]]


# --- the request's fields (no service) ---------------------------------------------------------


def test_a_query_is_read_from_json_values_or_form_text():
    query = parse_query({"embedding": [3, 4] + [0] * (DIM - 2), "top_k": "5", "exclude_camera": "2", "after": ""}, DIM)
    np.testing.assert_allclose(query.embedding[:2], [0.6, 0.8])
    assert (query.top_k, query.exclude_camera, query.after, query.before, query.image) == (5, 2, None, None, None)
    png = b"\x89PNG fake"
    assert parse_query({"image": base64.b64encode(png).decode()}, DIM).image == png


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "none was given"),
        ({"image": "x", "embedding": [1.0] * DIM}, "not both"),
        ({"embedding": [1.0] * (DIM + 1)}, f"embedding: {DIM + 1} values, but the index's model makes embeddings of {DIM}"),
        ({"embedding": [0.0] * DIM}, "not all zero"),
        ({"embedding": "1,2"}, "embedding: expected a list of numbers"),
        ({"embedding": [1.0] * DIM, "top_k": 0}, "top_k: expected a whole number >= 1"),
        ({"embedding": [1.0] * DIM, "top_k": "many"}, "top_k"),
        ({"embedding": [1.0] * DIM, "exclude_camera": -1}, "exclude_camera"),
        ({"embedding": [1.0] * DIM, "after": "yesterday"}, "after: expected seconds since the epoch"),
        ({"embedding": [1.0] * DIM, "topk": 3}, "unknown field 'topk'"),
    ],
)
def test_a_bad_query_is_refused_naming_its_field(fields, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        parse_query(fields, DIM)


# --- the command refuses another model before anything starts -------------------------------------


def refused(capsys, *arguments: str) -> str:
    """The one line `reid serve` refuses with: exit status 2, before any cluster starts (RAY_ADDRESS,
    set by the caller, names none: a command that went on would fail to connect, not hang)."""
    assert main(["serve", *arguments]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("reid: config error: ")
    return line


def test_reid_serve_refuses_a_model_of_another_size_or_version(gallery, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    small = save_model_dir(tiny_model(seed=1, embedding_dim=DIM // 2), PRE, tmp_path / "small")
    line = refused(capsys, str(gallery.index_dir), "--model", str(small))
    assert str(gallery.index_dir) in line and f"{DIM}-d" in line and f"{DIM // 2}-d" in line

    # an index built with version 1 of a registered model, served with version 2
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("gallery-model")
    run_id = client.create_run(client.create_experiment("search", artifact_location=str(tmp_path / "art"))).info.run_id
    versions = [client.create_model_version("gallery-model", str(gallery.model_dir), run_id=run_id).version for _ in range(2)]
    stamp = ModelStamp("gallery-model@champion", "gallery-model", str(versions[0]), run_id, DIM, False)
    index_dir = tmp_path / "registered-index"
    write_index(index_dir, gallery.embeddings, list_entries(str(Path(gallery.paths[0]).parent)), stamp, kind="flat")
    line = refused(capsys, str(index_dir), "--model", f"gallery-model/{versions[1]}", "--tracking-uri", uri)
    assert str(index_dir) in line and f"gallery-model version {versions[0]}" in line and f"version {versions[1]}" in line


# --- the service over HTTP -------------------------------------------------------------------------


@pytest.mark.ray
def test_the_service_answers_over_http_as_the_exact_ranking(service, gallery):
    health = requests.get(service.url + "healthz", timeout=10).json()
    assert (health["size"], health["model"]) == (len(gallery.paths), dataclasses.asdict(gallery.stamp))
    assert health["cameras"] == sorted(set(gallery.cameras.tolist()))
    top_k = 5
    queries = list(range(0, len(gallery.paths), max(1, len(gallery.paths) // 6)))
    for row in queries:  # a gallery crop as the query finds itself first, with score 1
        with open(gallery.paths[row], "rb") as image:
            reply = service.search(image_file=image, top_k=str(top_k))
        assert rows(reply) == gallery.ranking(gallery.embeddings[row], top_k)
        first = reply.json()["hits"][0]
        assert (first["path"], first["camera"], first["timestamp"]) == (gallery.paths[row], gallery.cameras[row], gallery.times[row])
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert requests.get(first["crop_url"], timeout=10).content == Path(gallery.paths[row]).read_bytes()

    row = queries[1]
    image = base64.b64encode(Path(gallery.paths[row]).read_bytes()).decode()
    assert rows(service.search(image=image, top_k=top_k)) == gallery.ranking(gallery.embeddings[row], top_k)
    embedding = gallery.embeddings[row].tolist()
    camera = int(gallery.cameras[row])
    across = service.search(embedding=embedding, top_k=top_k, exclude_camera=camera)
    assert rows(across) == gallery.ranking(gallery.embeddings[row], top_k, keep=gallery.cameras != camera)
    after, before = gallery.times[3], gallery.times[len(gallery.times) // 2]
    window = service.search(embedding=embedding, top_k=3, after=after, before=before)
    assert rows(window) == gallery.ranking(gallery.embeddings[row], 3, keep=(gallery.times >= after) & (gallery.times <= before))

    # queries that arrive together are embedded together, and each still gets its own answer
    before = requests.get(service.url + "healthz", timeout=10).json()["batches"]["count"]
    together = queries[:6]

    def ask(row: int) -> list[int]:
        with open(gallery.paths[row], "rb") as image:
            return rows(service.search(image_file=image, top_k="1"))

    with concurrent.futures.ThreadPoolExecutor(len(together)) as pool:
        assert list(pool.map(ask, together)) == [[row] for row in together]
    batches = requests.get(service.url + "healthz", timeout=10).json()["batches"]
    assert batches["largest"] > 1 and batches["count"] - before < len(together)


@pytest.mark.ray
def test_bad_requests_get_400_with_one_line_and_the_service_goes_on(service, gallery):
    size = len(gallery.paths)
    def post(body: bytes, kind: str) -> requests.Response:
        return requests.post(service.url + "search", data=body, headers={"content-type": kind}, timeout=10)

    bad = [
        (service.search(image_file=b"GIF89a not really"), "image: not an image (expected a JPEG or PNG)"),
        (service.search(image="aGVsbG8="), "image: not an image (expected a JPEG or PNG)"),
        (service.search(embedding=[0.1] * (DIM - 1)), f"embedding: {DIM - 1} values, but the index's model makes embeddings of {DIM}"),
        (service.search(embedding=[0.1] * DIM, top_k=size + 1), f"top-k {size + 1}"),
        (service.search(top_k=3), "give either 'image' (a JPEG or PNG) or 'embedding' (a list of numbers), none was given"),
        (post(b"{not json", "application/json"), "not valid JSON"),
        (post(b"raw", "image/jpeg"), "content type image/jpeg: send multipart/form-data"),
    ]
    for reply, named in bad:
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert named in error and "\n" not in error
    assert requests.get(service.url + f"crop/{size}", timeout=10).status_code == 404
    with open(gallery.paths[2], "rb") as image:  # still serving
        assert rows(service.search(image_file=image, top_k="1")) == [2]


# --- the page in headless Chromium -----------------------------------------------------------------


@pytest.mark.ray
def test_the_page_shows_the_top_crops_of_a_query_chosen_in_it(service, gallery, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the page's test needs Debian's chromium package (apt-get install chromium)"
    row = 2 * len(gallery.paths) // 3  # past the distractors (person 0), which the names sort first
    camera = int(gallery.cameras[row])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        ])  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(service.url)
            page.wait_for_selector(f"#camera option[value='{camera}']", state="attached")
            page.set_input_files("#file", gallery.paths[row])
            page.wait_for_selector("#hits li")
            hits = page.locator("#hits li")
            top_k = int(page.input_value("#topk"))
            assert hits.count() == top_k
            shown = [int(hits.nth(i).get_attribute("data-row")) for i in range(hits.count())]
            assert shown == gallery.ranking(gallery.embeddings[row], top_k)
            first = hits.first.inner_text()
            assert "#1" in first and "score 1.000" in first and f"camera {camera}" in first
            loaded = "() => [...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth > 0)"
            page.wait_for_function(loaded)
            screenshot = Path(os.environ.get("REID_SEARCH_PAGE_SCREENSHOT", tmp_path / "page.png"))
            page.screenshot(path=str(screenshot), full_page=True)

            # leaving out the query's camera: the page searches again, no crop of that camera is left
            page.select_option("#camera", str(camera))
            expected = gallery.ranking(gallery.embeddings[row], top_k, keep=gallery.cameras != camera)
            page.wait_for_function(f"() => document.querySelector('#hits li')?.dataset.row === '{expected[0]}'")
            shown = [int(hits.nth(i).get_attribute("data-row")) for i in range(hits.count())]
            assert shown == expected
            assert all(f"camera {camera} " not in hits.nth(i).inner_text() for i in range(hits.count()))
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
