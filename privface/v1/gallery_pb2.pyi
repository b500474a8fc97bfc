import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    MATCH: _ClassVar[Decision]
    NO_MATCH: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
MATCH: Decision
NO_MATCH: Decision

class ProtectedInput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Gallery(_message.Message):
    __slots__ = ("name", "description", "created_at", "subject_count", "sample_count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    created_at: _timestamp_pb2.Timestamp
    subject_count: int
    sample_count: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., subject_count: _Optional[int] = ..., sample_count: _Optional[int] = ...) -> None: ...

class TemplateVersion(_message.Message):
    __slots__ = ("model_version", "profile_name", "profile_version", "template_key_id", "sample_count", "searchable")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SEARCHABLE_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    profile_name: str
    profile_version: str
    template_key_id: str
    sample_count: int
    searchable: bool
    def __init__(self, model_version: _Optional[str] = ..., profile_name: _Optional[str] = ..., profile_version: _Optional[str] = ..., template_key_id: _Optional[str] = ..., sample_count: _Optional[int] = ..., searchable: _Optional[bool] = ...) -> None: ...

class GalleryStats(_message.Message):
    __slots__ = ("gallery", "template_versions", "indexed_samples", "index_type", "on_gpu", "default_threshold")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    ON_GPU_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    gallery: Gallery
    template_versions: _containers.RepeatedCompositeFieldContainer[TemplateVersion]
    indexed_samples: int
    index_type: str
    on_gpu: bool
    default_threshold: float
    def __init__(self, gallery: _Optional[_Union[Gallery, _Mapping]] = ..., template_versions: _Optional[_Iterable[_Union[TemplateVersion, _Mapping]]] = ..., indexed_samples: _Optional[int] = ..., index_type: _Optional[str] = ..., on_gpu: _Optional[bool] = ..., default_threshold: _Optional[float] = ...) -> None: ...

class CreateGalleryRequest(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class DeleteGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteGalleryResponse(_message.Message):
    __slots__ = ("gallery",)
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    gallery: Gallery
    def __init__(self, gallery: _Optional[_Union[Gallery, _Mapping]] = ...) -> None: ...

class ListGalleriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesResponse(_message.Message):
    __slots__ = ("galleries",)
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    galleries: _containers.RepeatedCompositeFieldContainer[Gallery]
    def __init__(self, galleries: _Optional[_Iterable[_Union[Gallery, _Mapping]]] = ...) -> None: ...

class GetGalleryStatsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model_version", "profile", "profile_version", "profile_digest", "embedding_dim", "template_dim", "default_threshold", "threshold_source", "template_key_id", "max_message_bytes", "max_views_per_input", "principal", "roles", "model_runtime")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_DIM_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_VIEWS_PER_INPUT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    MODEL_RUNTIME_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    profile: str
    profile_version: int
    profile_digest: str
    embedding_dim: int
    template_dim: int
    default_threshold: float
    threshold_source: str
    template_key_id: str
    max_message_bytes: int
    max_views_per_input: int
    principal: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    model_runtime: str
    def __init__(self, model_version: _Optional[str] = ..., profile: _Optional[str] = ..., profile_version: _Optional[int] = ..., profile_digest: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., template_dim: _Optional[int] = ..., default_threshold: _Optional[float] = ..., threshold_source: _Optional[str] = ..., template_key_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_views_per_input: _Optional[int] = ..., principal: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., model_runtime: _Optional[str] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "model_version", "profile_name", "profile_version", "template_key_id", "created_at")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    sample_id: int
    model_version: str
    profile_name: str
    profile_version: str
    template_key_id: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, sample_id: _Optional[int] = ..., model_version: _Optional[str] = ..., profile_name: _Optional[str] = ..., profile_version: _Optional[str] = ..., template_key_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Subject(_message.Message):
    __slots__ = ("subject_id", "display_name", "metadata", "created_at", "updated_at", "sample_count", "samples")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    display_name: str
    metadata: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    sample_count: int
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, subject_id: _Optional[str] = ..., display_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sample_count: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "display_name", "metadata", "samples", "idempotency_key")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    display_name: str
    metadata: _containers.ScalarMap[str, str]
    samples: _containers.RepeatedCompositeFieldContainer[ProtectedInput]
    idempotency_key: str
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., display_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., samples: _Optional[_Iterable[_Union[ProtectedInput, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("subject_id", "sample_ids", "replayed")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    replayed: bool
    def __init__(self, subject_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class EnrollBatchResult(_message.Message):
    __slots__ = ("index", "subject_id", "ok", "status", "reason", "message", "sample_ids", "replayed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    index: int
    subject_id: str
    ok: bool
    status: str
    reason: str
    message: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    replayed: bool
    def __init__(self, index: _Optional[int] = ..., subject_id: _Optional[str] = ..., ok: _Optional[bool] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AddSamplesRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "samples", "idempotency_key")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    samples: _containers.RepeatedCompositeFieldContainer[ProtectedInput]
    idempotency_key: str
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[ProtectedInput, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AddSamplesResponse(_message.Message):
    __slots__ = ("subject_id", "sample_ids", "replayed")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    replayed: bool
    def __init__(self, subject_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RemoveSamplesRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "sample_ids")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RemoveSamplesResponse(_message.Message):
    __slots__ = ("removed_sample_ids",)
    REMOVED_SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    removed_sample_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, removed_sample_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetSubjectRequest(_message.Message):
    __slots__ = ("gallery", "subject_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class ListSubjectsRequest(_message.Message):
    __slots__ = ("gallery", "page_size", "page_token")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    page_size: int
    page_token: str
    def __init__(self, gallery: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSubjectsResponse(_message.Message):
    __slots__ = ("subjects", "next_page_token")
    SUBJECTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    subjects: _containers.RepeatedCompositeFieldContainer[Subject]
    next_page_token: str
    def __init__(self, subjects: _Optional[_Iterable[_Union[Subject, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSubjectRequest(_message.Message):
    __slots__ = ("gallery", "subject_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ...) -> None: ...

class DeleteSubjectResponse(_message.Message):
    __slots__ = ("subject_id", "removed_sample_ids")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    removed_sample_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, subject_id: _Optional[str] = ..., removed_sample_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RenameSubjectRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "display_name")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    display_name: str
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class UpdateSubjectMetadataRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("gallery", "probe", "top_k", "threshold")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    probe: ProtectedInput
    top_k: int
    threshold: float
    def __init__(self, gallery: _Optional[str] = ..., probe: _Optional[_Union[ProtectedInput, _Mapping]] = ..., top_k: _Optional[int] = ..., threshold: _Optional[float] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("subject_id", "score", "sample_id", "match")
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    subject_id: str
    score: float
    sample_id: int
    match: bool
    def __init__(self, subject_id: _Optional[str] = ..., score: _Optional[float] = ..., sample_id: _Optional[int] = ..., match: _Optional[bool] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("decision", "subject_id", "score", "threshold", "candidates", "model_version")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    subject_id: str
    score: float
    threshold: float
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    model_version: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., subject_id: _Optional[str] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., model_version: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("gallery", "subject_id", "probe", "threshold")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    subject_id: str
    probe: ProtectedInput
    threshold: float
    def __init__(self, gallery: _Optional[str] = ..., subject_id: _Optional[str] = ..., probe: _Optional[_Union[ProtectedInput, _Mapping]] = ..., threshold: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("decision", "score", "threshold", "sample_id", "model_version")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    score: float
    threshold: float
    sample_id: int
    model_version: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., sample_id: _Optional[int] = ..., model_version: _Optional[str] = ...) -> None: ...
