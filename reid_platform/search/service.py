"""The gallery-search service (`reid serve`): a Ray Serve deployment holding a gallery index and the
model that made it, behind a small REST API and a web page.

    POST /search      an image (multipart ``image`` file, or JSON ``{"image": BASE64}``) or an
                      embedding (JSON ``{"embedding": [...]}``), with ``top_k``, ``exclude_camera``
                      (the query's camera: its gallery crops are left out), ``after`` and ``before``
                      (seconds since the epoch) -> ``{"hits": [{row, path, camera, timestamp,
                      source, score, crop_url}, ...]}``, best first
    GET  /healthz     the index's size, kind and cameras, the model stamp, the batches embedded so far
    GET  /crop/{row}  the gallery crop's image bytes
    GET  /            the page: drop a crop, see the top-k crops with their camera, time and score

Each replica opens the index (a folder every node reads) and loads the model once, from the files
``reid serve`` resolved and checked against the index (``model.resolve_model``), which reach the
replicas through Ray's object store. Query images are decoded and preprocessed in the
request (a bad one is answered alone, with HTTP 400), then embedded together with the other
requests waiting at that moment (``@serve.batch``): one forward pass for up to ``max_batch_size``
queries. A request the service cannot answer gets HTTP 400 and one line naming the field; the
replica goes on serving.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (``Request``, ``int``)
# after Serve has rewrapped them, where names in strings no longer resolve.
import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.datastructures import UploadFile

from reid_platform.data.images import IMAGE_MAGIC, decode_rgb, encoded_bytes
from reid_platform.errors import ConfigError, ReidError
from reid_platform.model.preprocess import eval_transform
from reid_platform.search.index import GalleryIndex, Hit
from reid_platform.search.model import GalleryModel, load_files
from reid_platform.search.sources import read_crop

APP_NAME = "reid-search"
DEFAULT_TOP_K = 20
BATCH_WAIT_S = 0.01  # how long a query waits for others to share its forward pass
FIELDS = ("image", "embedding", "top_k", "exclude_camera", "after", "before")


@dataclass(frozen=True)
class Query:
    """One search request, checked: exactly one of ``image`` (encoded bytes) and ``embedding``."""

    image: bytes | None
    embedding: np.ndarray | None  # (D,) float32, L2-normalised
    top_k: int
    exclude_camera: int | None
    after: float | None
    before: float | None


def parse_query(fields: dict, feature_dim: int) -> Query:
    """The query a request's fields describe (JSON values, or the text of form fields; an image as
    bytes or base64 text); a ConfigError naming the field that cannot be used."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    image, embedding = fields.get("image"), fields.get("embedding")
    if (image is None) == (embedding is None):
        raise ConfigError("give either 'image' (a JPEG or PNG) or 'embedding' (a list of numbers), " +
                          ("not both" if image is not None else "none was given"))  # fmt: skip
    return Query(
        image=_image(image) if image is not None else None,
        embedding=_embedding(embedding, feature_dim) if embedding is not None else None,
        top_k=_whole("top_k", fields.get("top_k", DEFAULT_TOP_K), minimum=1),
        exclude_camera=_optional(fields, "exclude_camera", lambda value: _whole("exclude_camera", value, minimum=0)),
        after=_optional(fields, "after", lambda value: _seconds("after", value)),
        before=_optional(fields, "before", lambda value: _seconds("before", value)),
    )


def _optional(fields: dict, name: str, convert):
    value = fields.get(name)
    return None if value is None or value == "" else convert(value)


def _whole(name: str, value, minimum: int) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return value


def _seconds(name: str, value) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds):
        raise ConfigError(f"{name}: expected seconds since the epoch, got {value!r}")
    return seconds


def _image(value) -> bytes:
    if not isinstance(value, (bytes, str)):
        raise ConfigError(f"image: expected an uploaded file or base64 text, got {type(value).__name__}")
    return encoded_bytes(value)


def _embedding(value, feature_dim: int) -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ConfigError("embedding: expected a list of numbers")
    if len(value) != feature_dim:
        raise ConfigError(f"embedding: {len(value)} values, but the index's model makes embeddings of {feature_dim}")
    vector = np.asarray(value, np.float64)
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise ConfigError("embedding: expected finite values, not all zero")
    return (vector / norm).astype(np.float32)  # the index compares unit vectors


async def request_fields(request: Request) -> dict:
    """The fields of a multipart form (files as their bytes) or of a JSON object."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form()
        fields = {}
        for name in dict.fromkeys(form.keys()):
            values = form.getlist(name)
            if len(values) > 1:
                raise ConfigError(f"{name}: given {len(values)} times, expected once (one query per request)")
            fields[name] = await values[0].read() if isinstance(values[0], UploadFile) else values[0]
        return fields
    if kind == "application/json":
        try:
            fields = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"the body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"expected a JSON object with 'image' or 'embedding', got {type(fields).__name__}")
        return fields
    raise ConfigError(f"content type {kind or 'none'}: send multipart/form-data with an 'image' file, or JSON")


def hit_fields(hit: Hit, crop_url: str) -> dict:
    """A hit as JSON: an unknown camera (-1) or time (NaN) is null."""
    return {
        "row": hit.row, "path": hit.path, "camera": hit.camera if hit.camera >= 0 else None,
        "timestamp": None if math.isnan(hit.timestamp) else hit.timestamp, "source": hit.source,
        "score": hit.score, "crop_url": crop_url,
    }  # fmt: skip


def _bad_request(error: Exception) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=400)


app = FastAPI(title="reid-platform gallery search", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(app)
class GallerySearch:
    def __init__(self, index_dir: str, model_files: list, max_batch_size: int):
        """``model_files``: [the ObjectRef of a GalleryModel's files] (in a list, so that it arrives unresolved)."""
        self.index = GalleryIndex.open(Path(index_dir))
        model, preprocessing = load_files(ray.get(model_files[0]))
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model, self.transform = model.eval().to(self.device), eval_transform(preprocessing)
        self.embed.set_max_batch_size(max_batch_size)
        self.cameras = [int(c) for c in np.unique(self.index.cameras) if c >= 0]
        self.batches, self.batched_queries, self.largest_batch = 0, 0, 0
        self.page_html = resources.files(__package__).joinpath("page.html").read_text()

    # max_batch_size: each replica's own, set in __init__
    @serve.batch(max_batch_size=1, batch_wait_timeout_s=BATCH_WAIT_S)
    async def embed(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """The embeddings of the preprocessed query images of every request waiting, in one pass."""
        self.batches, self.batched_queries = self.batches + 1, self.batched_queries + len(images)
        self.largest_batch = max(self.largest_batch, len(images))
        with torch.no_grad():
            embeddings = self.model.embed(torch.stack(images).to(self.device), self.index.model.flip)
        return list(embeddings.float().cpu().numpy())

    def preprocess(self, image: bytes) -> torch.Tensor:
        decoded, reason = decode_rgb(image)
        if decoded is None:
            raise ConfigError(f"image: {reason} (expected a JPEG or PNG)")
        return self.transform(decoded)

    @app.post("/search")
    async def search(self, request: Request):
        try:
            query = parse_query(await request_fields(request), self.index.model.feature_dim)
            vector = query.embedding if query.image is None else await self.embed(self.preprocess(query.image))
            cameras = None if query.exclude_camera is None else [query.exclude_camera]
            hits = self.index.search(vector[None], query.top_k, cameras, query.after, query.before)[0]
        except ReidError as error:
            return _bad_request(error)
        return {"hits": [hit_fields(hit, str(request.url_for("crop", row=hit.row))) for hit in hits]}

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {
            "status": "ok", "size": self.index.size, "kind": self.index.kind, "cameras": self.cameras,
            "model": dataclasses.asdict(self.index.model),
            "batches": {"count": self.batches, "queries": self.batched_queries, "largest": self.largest_batch},
        }  # fmt: skip

    @app.get("/crop/{row}")
    def crop(self, row: int) -> Response:
        if not 0 <= row < self.index.size:
            missing = f"row {row}: the gallery has rows 0 to {self.index.size - 1}"
            return JSONResponse({"error": missing}, status_code=404)
        path = self.index.metadata.column("path")[row].as_py()
        try:
            data = read_crop(path)
        except (ReidError, OSError) as error:  # moved or deleted since the index was built
            return JSONResponse({"error": f"row {row}: {path}: {error}"}, status_code=404)
        return Response(data, media_type="image/png" if data.startswith(IMAGE_MAGIC[1]) else "image/jpeg")

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page_html


@dataclass(frozen=True)
class Scaling:
    """A fixed number of replicas, or autoscaling between ``minimum`` and ``maximum``."""

    minimum: int
    maximum: int

    def options(self, max_batch_size: int) -> dict:
        if self.minimum == self.maximum:
            return {"num_replicas": self.minimum}
        # a replica is busy when it holds a full batch: add one when they all do
        return {"autoscaling_config": {"min_replicas": self.minimum, "max_replicas": self.maximum,
                                       "target_ongoing_requests": max_batch_size}}  # fmt: skip


def search_app(
    index_dir: Path, model: GalleryModel, scaling: Scaling, max_batch_size: int, gpus_per_replica: float = 0
) -> Application:
    """The service as a Serve application: ``scaling``'s replicas, each with the index and ``model``
    (checked against the index by the caller). Needs a connected Ray cluster (the model's files go
    into its object store)."""
    deployment = GallerySearch.options(
        **scaling.options(max_batch_size),
        max_ongoing_requests=2 * max_batch_size,  # room for a full batch while the previous one runs
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus_per_replica},
    )
    # the files by reference: Serve keeps a deployment's arguments in its checkpoint, no place for weights
    return deployment.bind(str(index_dir), [ray.put(model.files)], max_batch_size)


def start_service(app: Application, host: str, port: int) -> str:
    """Serve ``app`` on http://HOST:PORT/ of the connected Ray cluster; returns that URL once it answers."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}/"
