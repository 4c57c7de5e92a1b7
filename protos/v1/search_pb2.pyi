from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageQuery(_message.Message):
    __slots__ = ("image", "k", "filter", "tier")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    k: int
    filter: str
    tier: str
    def __init__(self, image: _Optional[bytes] = ..., k: _Optional[int] = ..., filter: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class VectorQuery(_message.Message):
    __slots__ = ("vector", "k", "filter", "tier", "student_id")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    k: int
    filter: str
    tier: str
    student_id: str
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., k: _Optional[int] = ..., filter: _Optional[str] = ..., tier: _Optional[str] = ..., student_id: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "path", "label", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    score: float
    path: str
    label: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., score: _Optional[float] = ..., path: _Optional[str] = ..., label: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchReply(_message.Message):
    __slots__ = ("hits", "embed_ms", "search_ms", "index_version", "queue_ms", "decode_ms", "batch_size")
    HITS_FIELD_NUMBER: _ClassVar[int]
    EMBED_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    embed_ms: float
    search_ms: float
    index_version: str
    queue_ms: float
    decode_ms: float
    batch_size: int
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., embed_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., index_version: _Optional[str] = ..., queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("image", "vector", "k", "tag", "filter", "tier", "student_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    vector: FloatVector
    k: int
    tag: int
    filter: str
    tier: str
    student_id: str
    def __init__(self, image: _Optional[bytes] = ..., vector: _Optional[_Union[FloatVector, _Mapping]] = ..., k: _Optional[int] = ..., tag: _Optional[int] = ..., filter: _Optional[str] = ..., tier: _Optional[str] = ..., student_id: _Optional[str] = ...) -> None: ...

class FloatVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class QueryResult(_message.Message):
    __slots__ = ("tag", "code", "message", "reply")
    TAG_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    tag: int
    code: int
    message: str
    reply: SearchReply
    def __init__(self, tag: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., reply: _Optional[_Union[SearchReply, _Mapping]] = ...) -> None: ...

class BatchSearchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ...) -> None: ...

class BatchSearchReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryResult]
    def __init__(self, results: _Optional[_Iterable[_Union[QueryResult, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("teacher_id", "student_id", "dim", "count", "factory", "metric", "max_k", "default_k", "index_version", "search_params", "student_architecture", "max_pixels", "max_batch_queries", "max_message_bytes", "batch_max_size", "batch_max_delay_ms", "admin_enabled", "tiers", "filter_fields", "backend")
    class SearchParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_K_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELDS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    teacher_id: str
    student_id: str
    dim: int
    count: int
    factory: str
    metric: str
    max_k: int
    default_k: int
    index_version: str
    search_params: _containers.ScalarMap[str, str]
    student_architecture: str
    max_pixels: int
    max_batch_queries: int
    max_message_bytes: int
    batch_max_size: int
    batch_max_delay_ms: float
    admin_enabled: bool
    tiers: _containers.RepeatedCompositeFieldContainer[StudentTier]
    filter_fields: _containers.RepeatedScalarFieldContainer[str]
    backend: str
    def __init__(self, teacher_id: _Optional[str] = ..., student_id: _Optional[str] = ..., dim: _Optional[int] = ..., count: _Optional[int] = ..., factory: _Optional[str] = ..., metric: _Optional[str] = ..., max_k: _Optional[int] = ..., default_k: _Optional[int] = ..., index_version: _Optional[str] = ..., search_params: _Optional[_Mapping[str, str]] = ..., student_architecture: _Optional[str] = ..., max_pixels: _Optional[int] = ..., max_batch_queries: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., batch_max_size: _Optional[int] = ..., batch_max_delay_ms: _Optional[float] = ..., admin_enabled: _Optional[bool] = ..., tiers: _Optional[_Iterable[_Union[StudentTier, _Mapping]]] = ..., filter_fields: _Optional[_Iterable[str]] = ..., backend: _Optional[str] = ...) -> None: ...

class StudentTier(_message.Message):
    __slots__ = ("name", "student_id", "architecture", "gflops", "measured_ms", "image_size", "gate_recall_at_1", "gate_teacher_recall_at_1", "gate_map", "gate_teacher_map", "gated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STUDENT_ID_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GATE_RECALL_AT_1_FIELD_NUMBER: _ClassVar[int]
    GATE_TEACHER_RECALL_AT_1_FIELD_NUMBER: _ClassVar[int]
    GATE_MAP_FIELD_NUMBER: _ClassVar[int]
    GATE_TEACHER_MAP_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    student_id: str
    architecture: str
    gflops: float
    measured_ms: float
    image_size: int
    gate_recall_at_1: float
    gate_teacher_recall_at_1: float
    gate_map: float
    gate_teacher_map: float
    gated: bool
    def __init__(self, name: _Optional[str] = ..., student_id: _Optional[str] = ..., architecture: _Optional[str] = ..., gflops: _Optional[float] = ..., measured_ms: _Optional[float] = ..., image_size: _Optional[int] = ..., gate_recall_at_1: _Optional[float] = ..., gate_teacher_recall_at_1: _Optional[float] = ..., gate_map: _Optional[float] = ..., gate_teacher_map: _Optional[float] = ..., gated: _Optional[bool] = ...) -> None: ...

class AddImagesRequest(_message.Message):
    __slots__ = ("folder", "metadata_csv")
    FOLDER_FIELD_NUMBER: _ClassVar[int]
    METADATA_CSV_FIELD_NUMBER: _ClassVar[int]
    folder: str
    metadata_csv: str
    def __init__(self, folder: _Optional[str] = ..., metadata_csv: _Optional[str] = ...) -> None: ...

class UploadImage(_message.Message):
    __slots__ = ("name", "label", "data", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    label: str
    data: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., label: _Optional[str] = ..., data: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadStudentRequest(_message.Message):
    __slots__ = ("tier", "path")
    TIER_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    tier: str
    path: str
    def __init__(self, tier: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class RemoveImagesRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class UpdateReply(_message.Message):
    __slots__ = ("index_version", "count", "changed", "message")
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    count: int
    changed: bool
    message: str
    def __init__(self, index_version: _Optional[str] = ..., count: _Optional[int] = ..., changed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
