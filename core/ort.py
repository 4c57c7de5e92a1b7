"""The onnxruntime session wrapper every stage uses to run an exported model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort
from PIL import Image

from asymsearch.core.errors import ManifestError, UserError
from asymsearch.core.manifest import ModelManifest, manifest_path_for, sha256_file
from asymsearch.core.preprocess import preprocess_batch


def available_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA when onnxruntime has it (TensorRT is left to an explicit choice), always CPU as the fallback."""
    have = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if prefer_gpu and p in have]
    return chosen + ["CPUExecutionProvider"]


class OnnxEmbedder:
    """An exported embedding model and its manifest. `embed_images` prepares pixels exactly as the manifest says.

    The sha256 in the manifest is checked at load unless `verify_hash=False`: a model that drifted from its
    manifest is refused.
    """

    def __init__(self, onnx_path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int = 0, verify_hash: bool = True) -> None:
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        self.manifest = ModelManifest.load(manifest_path_for(self.path))
        if verify_hash:
            digest = sha256_file(self.path)
            if digest != self.manifest.sha256:
                raise ManifestError(f"{self.path} does not match its manifest (sha256 {digest[:12]}... "
                                    f"!= {self.manifest.sha256[:12]}...); re-export it")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                            providers=list(providers or available_providers()))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def teacher_id(self) -> str:
        return self.manifest.teacher_id

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) float32 -> embeddings (N, dim) float32."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_arrays(preprocess_batch(images, self.manifest.preprocessing))
