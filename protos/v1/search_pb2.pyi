from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageQuery(_message.Message):
    __slots__ = ("image", "k")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ...) -> None: ...

class VectorQuery(_message.Message):
    __slots__ = ("vector", "k")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    k: int
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., k: _Optional[int] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "path", "label")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    path: str
    label: str
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., path: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class SearchReply(_message.Message):
    __slots__ = ("hits", "embed_ms", "search_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    embed_ms: float
    search_ms: float
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("teacher_id", "student_id", "dim", "count", "factory", "metric", "max_k", "default_k")
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    teacher_id: str
    student_id: str
    dim: int
    count: int
    factory: str
    metric: str
    max_k: int
    default_k: int
    def __init__(self, teacher_id: _Optional[str] = ..., student_id: _Optional[str] = ..., dim: _Optional[int] = ..., count: _Optional[int] = ..., factory: _Optional[str] = ..., metric: _Optional[str] = ..., max_k: _Optional[int] = ..., default_k: _Optional[int] = ...) -> None: ...
