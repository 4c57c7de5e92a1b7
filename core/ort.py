"""The onnxruntime session wrapper every stage uses to run an exported model.

Loading is where a model is checked, so every stage (index builder, server, client, evaluation) refuses the same
bad files with the same message: a file whose sha256 differs from its manifest (tampered, truncated, re-exported
without its manifest), a file onnxruntime cannot parse, a model whose inputs and outputs contradict its
manifest, a student manifest without the id of its teacher. Each message names the file and the mismatch.

Execution providers follow what the installed onnxruntime offers: TensorRT, then CUDA, when present (the
onnxruntime-gpu build), the CPU always as the fallback. Thread counts come from the arguments or, for the stages
that do not expose them, from the environment variables `ASYMSEARCH_ORT_INTRA_OP_THREADS` and
`ASYMSEARCH_ORT_INTER_OP_THREADS` (0 or unset: onnxruntime's default, one thread per physical core).
"""
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

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # in order of preference
CPU_PROVIDER = "CPUExecutionProvider"
INTRA_OP_ENV = "ASYMSEARCH_ORT_INTRA_OP_THREADS"
INTER_OP_ENV = "ASYMSEARCH_ORT_INTER_OP_THREADS"


class ModelLoadError(ManifestError):
    """An ONNX file onnxruntime cannot load, or one whose graph contradicts its manifest."""


def available_providers(prefer_gpu: bool = True, *, tensorrt: bool = True) -> list[str]:
    """TensorRT (unless `tensorrt=False`) and CUDA when this onnxruntime build has them, always CPU last.

    onnxruntime itself falls back to the next provider for any node (or whole model) the first cannot run, so
    listing a GPU provider on a build that has it is safe even when its libraries turn out to be missing.
    """
    if not prefer_gpu:
        return [CPU_PROVIDER]
    have = set(ort.get_available_providers())
    chosen = [p for p in GPU_PROVIDERS if p in have and (tensorrt or p != "TensorrtExecutionProvider")]
    return chosen + [CPU_PROVIDER]


def _threads_from_env(name: str, given: int) -> int:
    if given:
        return given
    raw = os.environ.get(name, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{name} must be a whole number of threads, not {raw!r}") from None
    if value < 0:
        raise UserError(f"{name} must be >= 0, not {value}")
    return value


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0) -> ort.SessionOptions:
    """SessionOptions with the thread counts (0: the environment variables, else onnxruntime's default) and
    onnxruntime's quiet log level."""
    if intra_op_threads < 0 or inter_op_threads < 0:
        raise UserError("thread counts must be >= 0 (0 picks onnxruntime's default)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads_from_env(INTRA_OP_ENV, intra_op_threads)
    options.inter_op_num_threads = _threads_from_env(INTER_OP_ENV, inter_op_threads)
    options.log_severity_level = 3
    return options


def open_session(path: str | os.PathLike, *, providers: Sequence[str] | None = None, intra_op_threads: int = 0,
                 inter_op_threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession on `path` (ONNX or ORT format), a file onnxruntime cannot load -> `ModelLoadError`."""
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads, inter_op_threads),
                                    providers=list(providers or available_providers()))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (pybind) exception classes for a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ModelLoadError(f"{path} is not a model onnxruntime can load (truncated or corrupt?): {first}") from None


class OnnxEmbedder:
    """An exported embedding model and its manifest. `embed_images` prepares pixels exactly as the manifest says.

    At load: the sha256 in the manifest is checked (unless `verify_hash=False`), the graph's input and output
    are checked against the manifest, and (unless `warmup=False`) one batch of zeros is run, so the first real
    query does not pay for onnxruntime's lazy initialisation and a broken model fails here, not mid-request.
    """

    def __init__(self, onnx_path: str | os.PathLike, *, providers: Sequence[str] | None = None,
                 intra_op_threads: int = 0, verify_hash: bool = True, inter_op_threads: int = 0,
                 warmup: bool = True) -> None:
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise UserError(f"ONNX model not found: {self.path}")
        self.manifest_path = manifest_path_for(self.path)
        self.manifest = ModelManifest.load(self.manifest_path)
        if verify_hash:
            digest = sha256_file(self.path)
            if digest != self.manifest.sha256:
                raise ManifestError(f"{self.path} does not match its manifest {self.manifest_path} (sha256 "
                                    f"{digest[:12]}... != {self.manifest.sha256[:12]}...): the file was changed or "
                                    f"truncated after export; re-export it")
        self.session = open_session(self.path, providers=providers, intra_op_threads=intra_op_threads,
                                    inter_op_threads=inter_op_threads)
        self._check_graph()
        self.input_name = self.manifest.input_name
        self.output_name = self.manifest.output_name
        if warmup:
            self.warmup()

    def _mismatch(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path} does not match its manifest {self.manifest_path}: {what}")

    def _check_graph(self) -> None:
        m = self.manifest
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise self._mismatch(f"the model takes {len(inputs)} inputs, the manifest describes one ({m.input_name!r})")
        inp = inputs[0]
        if inp.name != m.input_name:
            raise self._mismatch(f"the model's input is {inp.name!r}, the manifest says {m.input_name!r}")
        if inp.type != "tensor(float)":
            raise self._mismatch(f"the model's input is {inp.type}, embedders feed tensor(float)")
        if len(inp.shape) != 4:
            raise self._mismatch(f"the model's input has rank {len(inp.shape)}, images need (batch, 3, height, width)")
        channels, height, width = inp.shape[1:]
        if isinstance(channels, int) and channels != 3:
            raise self._mismatch(f"the model takes {channels} channels, not 3")
        for name, size in (("height", height), ("width", width)):
            if isinstance(size, int) and size != m.input_size:
                raise self._mismatch(f"the model's input {name} is fixed at {size}, "
                                     f"the manifest's crop is {m.input_size}")
        if m.output_name not in [o.name for o in outputs]:
            raise self._mismatch(f"the model has no output {m.output_name!r} (it has "
                                 f"{', '.join(repr(o.name) for o in outputs)})")
        out = next(o for o in outputs if o.name == m.output_name)
        if len(out.shape) != 2:
            raise self._mismatch(f"output {out.name!r} has rank {len(out.shape)}, embeddings need (batch, dim)")
        if isinstance(out.shape[1], int) and out.shape[1] != m.dim:
            raise self._mismatch(f"the model embeds into {out.shape[1]} dimensions, the manifest says {m.dim}")

    def warmup(self) -> None:
        """Run one image of zeros at the manifest's crop; its output must be (1, dim) and finite."""
        size = self.manifest.input_size
        got = self.embed_arrays(np.zeros((1, 3, size, size), np.float32))
        if got.shape != (1, self.dim):
            raise self._mismatch(f"the model returned shape {got.shape} for one image, expected (1, {self.dim})")
        if not np.all(np.isfinite(got)):
            raise ModelLoadError(f"{self.path} returns non-finite embeddings for an image of zeros")

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def teacher_id(self) -> str:
        return self.manifest.teacher_id

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually uses, in order."""
        return list(self.session.get_providers())

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed pixels (N, 3, H, W) float32 -> embeddings (N, dim) float32."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch, np.float32)})[0]
        return np.asarray(out, dtype=np.float32)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_arrays(preprocess_batch(images, self.manifest.preprocessing))
