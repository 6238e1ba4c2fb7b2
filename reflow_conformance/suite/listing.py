"""list_runs: newest first by (created_at, id), filters, and exact keyset paging."""

from __future__ import annotations

from reflow_conformance.cases import case
from reflow_conformance.harness import Harness, expect
from reflow_core.types import RunFilter, RunStatus, WorkflowRun


def _ids(runs: list[WorkflowRun]) -> list[str]:
    return [r.id for r in runs]


def _newest_first(runs: list[WorkflowRun]) -> list[str]:
    return [r.id for r in sorted(runs, key=lambda r: (r.created_at, r.id), reverse=True)]


async def _all_pages(h: Harness, base: RunFilter) -> list[str]:
    """Walk every page with keyset paging; fail on a page larger than the limit."""
    seen: list[str] = []
    before, before_id = base.before, base.before_id
    for _ in range(10_000):
        page = await h.storage.list_runs(
            RunFilter(
                status=base.status,
                workflow=base.workflow,
                before=before,
                before_id=before_id,
                limit=base.limit,
            )
        )
        expect(len(page) <= base.limit, True, f"page of {len(page)} rows, limit {base.limit}")
        if not page:
            return seen
        seen.extend(_ids(page))
        before, before_id = page[-1].created_at, page[-1].id
    raise AssertionError("keyset paging never ended (a page repeats)")


@case("listing.newest_first")
async def newest_first(h: Harness) -> None:
    """Runs list newest first by created_at."""
    a = await h.create(created_at=1)
    b = await h.create(created_at=2)
    c = await h.create(created_at=3)
    expect(_ids(await h.storage.list_runs(RunFilter())), [c.id, b.id, a.id], "order")


@case("listing.ties_by_id_descending")
async def ties_by_id_descending(h: Harness) -> None:
    """Equal created_at: higher id first."""
    for run_id in ("r-b", "r-a", "r-c"):
        await h.create(id=run_id, created_at=7)
    expect(_ids(await h.storage.list_runs(RunFilter())), ["r-c", "r-b", "r-a"], "order")


@case("listing.id_order_is_code_point_order")
async def id_order_is_code_point_order(h: Harness) -> None:
    """Ids compare by code point (as Python str does), not by a locale collation."""
    ids = ["B", "a", "Z", "é", "e", "_", "🚀", "10", "9"]
    runs = [await h.create(id=run_id, created_at=7) for run_id in ids]
    expect(_ids(await h.storage.list_runs(RunFilter())), _newest_first(runs), "order")
    expect(await _all_pages(h, RunFilter(limit=2)), _newest_first(runs), "paged order")


@case("listing.filter_status")
async def filter_status(h: Harness) -> None:
    """The status filter returns only runs in that status."""
    running = await h.created_and_claimed()
    pending = await h.create()
    by_status = {
        RunStatus.PENDING: [pending.id],
        RunStatus.RUNNING: [running.run.id],
        RunStatus.COMPLETED: [],
    }
    for status, ids in by_status.items():
        listed = await h.storage.list_runs(RunFilter(status=status))
        expect(_ids(listed), ids, f"list_runs(status={status.value})")


@case("listing.filter_workflow")
async def filter_workflow(h: Harness) -> None:
    """The workflow filter returns only runs of that workflow."""
    a = await h.create("a")
    b = await h.create("b")
    expect(_ids(await h.storage.list_runs(RunFilter(workflow="a"))), [a.id], "workflow a")
    expect(_ids(await h.storage.list_runs(RunFilter(workflow="b"))), [b.id], "workflow b")
    expect(await h.storage.list_runs(RunFilter(workflow="c")), [], "workflow c")


@case("listing.filter_both")
async def filter_both(h: Harness) -> None:
    """Status and workflow filters combine (AND)."""
    await h.create("a")
    claimed = await h.created_and_claimed("b")
    await h.create("b")
    listed = await h.storage.list_runs(RunFilter(workflow="b", status=RunStatus.RUNNING))
    expect(_ids(listed), [claimed.run.id], "workflow b and running")


@case("listing.limit")
async def limit(h: Harness) -> None:
    """At most limit rows, the newest ones."""
    runs = [await h.create(created_at=i) for i in range(10)]
    listed = await h.storage.list_runs(RunFilter(limit=3))
    expect(_ids(listed), _newest_first(runs)[:3], "list_runs(limit=3)")


@case("listing.before_alone_is_strict")
async def before_alone_is_strict(h: Harness) -> None:
    """before without before_id returns only created_at < before."""
    runs = [await h.create(created_at=t) for t in (1, 2, 2, 3)]
    listed = await h.storage.list_runs(RunFilter(before=2))
    expect(_ids(listed), [runs[0].id], "list_runs(before=2)")


@case("listing.keyset_with_equal_created_at")
async def keyset_with_equal_created_at(h: Harness) -> None:
    """Three runs sharing created_at, pages of 2: each seen exactly once, in order."""
    runs = [await h.create(created_at=5) for _ in range(3)]
    expect(await _all_pages(h, RunFilter(limit=2)), _newest_first(runs), "all pages")


@case("listing.keyset_many_pages")
async def keyset_many_pages(h: Harness) -> None:
    """250 runs over 5 created_at values, pages of 7: exact, no row lost or repeated."""
    runs = [await h.create(created_at=1_000 + i % 5) for i in range(250)]
    expect(await _all_pages(h, RunFilter(limit=7)), _newest_first(runs), "all pages")


@case("listing.keyset_with_filters")
async def keyset_with_filters(h: Harness) -> None:
    """Keyset paging stays exact under a workflow filter with interleaved other runs."""
    mine = []
    for i in range(40):
        run = await h.create("mine" if i % 2 else "other", created_at=i // 4)
        if i % 2:
            mine.append(run)
    pages = await _all_pages(h, RunFilter(workflow="mine", limit=3))
    expect(pages, _newest_first(mine), "filtered pages")


@case("listing.empty_store")
async def empty_store(h: Harness) -> None:
    """An empty store lists nothing."""
    expect(await h.storage.list_runs(RunFilter()), [], "list_runs on an empty store")


@case("listing.full_records")
async def full_records(h: Harness) -> None:
    """Listed runs are complete records, equal to get_run."""
    claimed = await h.created_and_claimed("wf", {"x": [1, 2]})
    await h.create("wf", "second")
    listed = await h.storage.list_runs(RunFilter())
    expect(listed, [await h.get(r.id) for r in listed], "listed records vs get_run")
    expect(claimed.run.id in _ids(listed), True, "the claimed run is listed")
