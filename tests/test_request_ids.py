"""Request ids: unique across processes, growing with time, and fit for the ledger's key."""

from __future__ import annotations

import multiprocessing

from lmgate.api.http import Request, new_request_id


async def _nothing(*_: object) -> None:
    return None


def _request(headers: list[tuple[bytes, bytes]]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    return Request(scope, _nothing, _nothing)  # type: ignore[arg-type]


def test_ids_are_unique_and_ordered() -> None:
    ids = [new_request_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # appended at the end of the ledger's unique index
    assert all(len(i) == 32 and i.isascii() for i in ids)


def _child_ids(out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put([new_request_id() for _ in range(100)])


def test_forked_processes_do_not_share_ids() -> None:
    """Workers forked from one parent each get their own tag (and counter)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_child_ids, args=(out,)) for _ in range(2)]
    for p in procs:
        p.start()
    batches = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
    mine = [new_request_id() for _ in range(100)]
    every = [*batches[0], *batches[1], *mine]
    assert len(set(every)) == 300
    assert len({i[12:20] for i in every}) == 3  # one tag per process


def test_client_ids_are_echoed_and_records_stay_unique() -> None:
    long_id = b"c" * 128
    a = _request([(b"x-request-id", long_id)])
    b = _request([(b"x-request-id", long_id)])
    assert a.request_id == b.request_id == long_id
    assert a.record_id != b.record_id
    assert len(a.record_id) <= 128 and a.record_id.startswith(b"c" * 64)
    plain = _request([])
    assert plain.record_id == plain.request_id and len(plain.request_id) == 32
