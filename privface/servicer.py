"""gRPC servicers: translate messages to engine calls and exceptions to status codes.

Nothing here decides anything; :mod:`privface.gallery_service` does. Every refusal leaves
through :func:`_fail`, which sets the status code, the message and (when there is one) the
``privface-reason`` trailing metadata. Unexpected exceptions are logged with their stack and
answered INTERNAL without details, so internals never leak to a caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from privface.auth import AuthError, current_principal
from privface.batching import groups
from privface.errors import ServiceError
from privface.gallery_service import EnrollItem, GalleryEngine
from privface.v1 import gallery_pb2 as pb
from privface.v1 import gallery_pb2_grpc as rpc
from storage.errors import StorageError
from storage.records import GalleryInfo, SubjectRecord

log = logging.getLogger("privface.service")

T = TypeVar("T")
REASON_KEY = "privface-reason"
#: EnrollBatch items embedded and committed together (what arrived while the last group ran)
ENROLL_GROUP = 32


def _status(exc: BaseException) -> tuple[str, str, str] | None:
    """(status name, message, reason) of an expected exception, else None."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc), exc.reason
    if isinstance(exc, AuthError):
        return exc.code, str(exc), ""
    if isinstance(exc, StorageError):
        return exc.grpc_code, str(exc), ""
    return None


def _fail(context: grpc.ServicerContext, code: str, message: str, reason: str = "") -> NoReturn:
    if reason:
        context.set_trailing_metadata(((REASON_KEY, reason),))
    context.abort(grpc.StatusCode[code], message)
    raise AssertionError("unreachable")  # context.abort raises


def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every exception becomes a status
        known = _status(exc)
        if known is None:
            log.exception("internal error")
            known = ("INTERNAL", "internal error (details are in the server log)", "")
    _fail(context, *known)


def _ts(value: datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value)
    return ts


def gallery_msg(info: GalleryInfo) -> pb.Gallery:
    return pb.Gallery(
        name=info.name,
        description=info.description,
        created_at=_ts(info.created_at),
        subject_count=info.subject_count,
        sample_count=info.sample_count,
    )


def subject_msg(record: SubjectRecord) -> pb.Subject:
    return pb.Subject(
        subject_id=record.subject_id,
        display_name=record.display_name,
        metadata=record.metadata,
        created_at=_ts(record.created_at),
        updated_at=_ts(record.updated_at),
        sample_count=record.sample_count,
        samples=[
            pb.Sample(
                sample_id=s.sample_id,
                model_version=s.model_version,
                profile_name=s.profile_name,
                profile_version=s.profile_version,
                template_key_id=s.template_key_id,
                created_at=_ts(s.created_at),
            )
            for s in record.samples
        ],
    )


def _decision(match: bool) -> int:
    return pb.MATCH if match else pb.NO_MATCH


def _threshold(request: Any) -> float | None:
    return request.threshold if request.HasField("threshold") else None


class GalleryServicer(rpc.GalleryServiceServicer):
    def __init__(self, engine: GalleryEngine) -> None:
        self.engine = engine

    def CreateGallery(self, request, context):
        info = _call(context, lambda: self.engine.create_gallery(
            current_principal(), request.name, request.description))
        return gallery_msg(info)

    def DeleteGallery(self, request, context):
        info = _call(context, lambda: self.engine.delete_gallery(current_principal(),
                                                                 request.name))
        return pb.DeleteGalleryResponse(gallery=gallery_msg(info))

    def ListGalleries(self, request, context):
        infos = _call(context, lambda: self.engine.list_galleries(current_principal()))
        return pb.ListGalleriesResponse(galleries=[gallery_msg(i) for i in infos])

    def GetGalleryStats(self, request, context):
        stats = _call(context, lambda: self.engine.gallery_stats(current_principal(),
                                                                 request.name))
        return pb.GalleryStats(
            gallery=gallery_msg(stats.gallery),
            template_versions=[pb.TemplateVersion(**row) for row in stats.template_versions],
            indexed_samples=stats.indexed_samples,
            index_type=stats.index_type,
            on_gpu=stats.on_gpu,
            default_threshold=stats.default_threshold,
        )

    def GetServerInfo(self, request, context):
        def info() -> pb.ServerInfo:
            principal = current_principal()
            return pb.ServerInfo(
                **self.engine.server_info(),
                principal=principal.name,
                roles=sorted(principal.roles),
            )

        return _call(context, info)


class SubjectServicer(rpc.SubjectServiceServicer):
    def __init__(self, engine: GalleryEngine) -> None:
        self.engine = engine

    def _enroll(self, request: pb.EnrollRequest):
        return self.engine.enroll(
            current_principal(),
            request.gallery,
            request.subject_id,
            [s.data for s in request.samples],
            display_name=request.display_name,
            metadata=dict(request.metadata),
            idempotency_key=request.idempotency_key,
        )

    def Enroll(self, request, context):
        result = _call(context, lambda: self._enroll(request))
        return pb.EnrollResponse(subject_id=result.subject_id,
                                 sample_ids=list(result.sample_ids), replayed=result.replayed)

    def EnrollBatch(self, request_iterator, context) -> Iterator[pb.EnrollBatchResult]:
        principal = current_principal()
        count = 0
        for group in groups(request_iterator, ENROLL_GROUP):
            items = [EnrollItem(r.gallery, r.subject_id, [s.data for s in r.samples],
                                r.display_name, dict(r.metadata), r.idempotency_key)
                     for r in group]
            for item, result in zip(items, self.engine.enroll_many(principal, items),
                                    strict=True):
                index, count = count, count + 1
                if isinstance(result, Exception):
                    known = _status(result)
                    if known is None:
                        log.error("internal error in batch item %d", index, exc_info=result)
                        known = ("INTERNAL", "internal error (details are in the server log)", "")
                    code, message, reason = known
                    yield pb.EnrollBatchResult(index=index, subject_id=item.subject_id, ok=False,
                                               status=code, reason=reason, message=message)
                    continue
                yield pb.EnrollBatchResult(
                    index=index, subject_id=result.subject_id, ok=True, status="OK",
                    sample_ids=list(result.sample_ids), replayed=result.replayed,
                )
        if count == 0:
            _fail(context, "INVALID_ARGUMENT", "empty batch: the stream held no enrol request",
                  "empty")

    def AddSamples(self, request, context):
        result = _call(context, lambda: self.engine.add_samples(
            current_principal(), request.gallery, request.subject_id,
            [s.data for s in request.samples], idempotency_key=request.idempotency_key))
        return pb.AddSamplesResponse(subject_id=result.subject_id,
                                     sample_ids=list(result.sample_ids), replayed=result.replayed)

    def RemoveSamples(self, request, context):
        removed = _call(context, lambda: self.engine.remove_samples(
            current_principal(), request.gallery, request.subject_id, list(request.sample_ids)))
        return pb.RemoveSamplesResponse(removed_sample_ids=removed)

    def GetSubject(self, request, context):
        record = _call(context, lambda: self.engine.get_subject(
            current_principal(), request.gallery, request.subject_id))
        return subject_msg(record)

    def ListSubjects(self, request, context):
        page = _call(context, lambda: self.engine.list_subjects(
            current_principal(), request.gallery, request.page_size, request.page_token))
        return pb.ListSubjectsResponse(subjects=[subject_msg(r) for r in page.subjects],
                                       next_page_token=page.next_page_token)

    def DeleteSubject(self, request, context):
        removed = _call(context, lambda: self.engine.delete_subject(
            current_principal(), request.gallery, request.subject_id))
        return pb.DeleteSubjectResponse(subject_id=request.subject_id, removed_sample_ids=removed)

    def RenameSubject(self, request, context):
        record = _call(context, lambda: self.engine.rename_subject(
            current_principal(), request.gallery, request.subject_id, request.display_name))
        return subject_msg(record)

    def UpdateSubjectMetadata(self, request, context):
        record = _call(context, lambda: self.engine.update_metadata(
            current_principal(), request.gallery, request.subject_id, dict(request.metadata)))
        return subject_msg(record)


class MatchServicer(rpc.MatchServiceServicer):
    def __init__(self, engine: GalleryEngine) -> None:
        self.engine = engine

    def Identify(self, request, context):
        result = _call(context, lambda: self.engine.identify(
            current_principal(), request.gallery, request.probe.data, request.top_k,
            _threshold(request)))
        return pb.IdentifyResponse(
            decision=_decision(result.match),
            subject_id=result.subject_id,
            score=result.score,
            threshold=result.threshold,
            candidates=[
                pb.Candidate(subject_id=c.subject_id, score=c.score, sample_id=c.sample_id,
                             match=c.match)
                for c in result.candidates
            ],
            model_version=result.model_version,
        )

    def Verify(self, request, context):
        result = _call(context, lambda: self.engine.verify(
            current_principal(), request.gallery, request.subject_id, request.probe.data,
            _threshold(request)))
        return pb.VerifyResponse(decision=_decision(result.match), score=result.score,
                                 threshold=result.threshold, sample_id=result.sample_id,
                                 model_version=result.model_version)


SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("GalleryService", "SubjectService", "MatchService")
)


def add_to_server(engine: GalleryEngine, server: grpc.Server) -> None:
    rpc.add_GalleryServiceServicer_to_server(GalleryServicer(engine), server)
    rpc.add_SubjectServiceServicer_to_server(SubjectServicer(engine), server)
    rpc.add_MatchServiceServicer_to_server(MatchServicer(engine), server)
