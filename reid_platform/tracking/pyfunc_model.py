"""The MLflow pyfunc flavour of a re-ID model, logged as *models from code*: MLflow stores this file
and runs it to load the model, the weights travel as the model directory's safetensors and JSON
(``model/artifact.py``), and nothing is ever unpickled.

    model = mlflow.pyfunc.load_model("models:/reid-demo@champion")
    embeddings = model.predict(pandas.DataFrame({"image": [jpeg_bytes, ...]}))   # (N, D), L2-normalised
    model.predict(frame, params={"flip": True})                                # averaged with mirrors

``image`` holds encoded JPEG or PNG bytes (base64 strings in a REST request, MLflow's convention for
a binary column: ``dataframe_split`` payloads arrive decoded, ``inputs`` payloads as the base64
text, which is decoded here) or decoded uint8 arrays of shape (H, W, 3). Each is preprocessed as
``reid embed`` does it. A value that is neither fails the whole request with one line naming its
row, which the serving process answers with HTTP 400 and keeps serving.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

MODEL_DIR = "model_dir"  # the artifact: a model directory (model.safetensors + model.json)
IMAGE_COLUMN = "image"


class BadRequest(MlflowException):
    """A request the model cannot answer, with a one-line reason. MLflow's scoring server prepends
    the whole request (megabytes of images) to the message of any MlflowException it relays; this
    one keeps its message as it is, so the HTTP 400 answer says only what is wrong."""

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _prefixed: str) -> None:
        pass


def decode(value, row: int) -> Image.Image:
    """One image of a request: encoded bytes (or their base64 text), or a decoded (H, W, 3) uint8 array."""
    if isinstance(value, (bytes, bytearray, str)):
        from reid_platform.data.images import decode_rgb, encoded_bytes

        image, reason = decode_rgb(encoded_bytes(value))
        if image is None:
            raise BadRequest(f"image {row}: {reason}")
        return image
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise BadRequest(
            f"image {row}: expected encoded JPEG/PNG bytes or a uint8 array (H, W, 3), got "
            f"{type(value).__name__} {array.dtype} of shape {array.shape}"
        )
    return Image.fromarray(array, "RGB")


def images_of(model_input) -> list:
    """The images of a DataFrame or a mapping (an ``image`` column), a list or an array batch."""
    if isinstance(model_input, (pd.DataFrame, dict)):
        if IMAGE_COLUMN not in model_input:
            raise BadRequest(f"no {IMAGE_COLUMN!r} column in the request (got {', '.join(map(str, model_input)) or 'none'})")
        return list(model_input[IMAGE_COLUMN])
    return list(model_input)


class ReIDEmbedder(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from reid_platform.model.artifact import load_model_dir
        from reid_platform.model.preprocess import eval_transform

        self.model, preprocessing = load_model_dir(context.artifacts[MODEL_DIR])
        self.transform = eval_transform(preprocessing)

    # (a DataFrame hint: MLflow then checks requests against the logged signature, and infers nothing)
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        images = images_of(model_input)
        if not images:
            return np.zeros((0, self.model.feature_dim), np.float32)
        batch = torch.stack([self.transform(decode(value, row)) for row, value in enumerate(images)])
        return self.model.embed(batch, flip=bool((params or {}).get("flip", False))).float().numpy()


mlflow.models.set_model(ReIDEmbedder())
