"""The jobs API (``/api/jobs``), through which frontends from 1.5x on read the queue and the history.

The frontend validates a whole page strictly: one malformed job empties its list. So every job here has
exactly the documented fields and types, an error object only when it names its node, and pages come newest
first.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .prompt_queue import HistoryRecord, QueueItem
from .json_io import json_response, read_json
from .server_state import STATE

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
DEFAULT_LIMIT = 100
PREVIEWABLE = ("images",)  # the UI keys whose items the frontend can show as thumbnails

routes = web.RouteTableDef()


def _job(item: QueueItem, status: str, record: HistoryRecord | None = None) -> dict[str, Any]:
    outputs = record.result.outputs if record else {}
    previews = [(node, key, entry) for node, ui in outputs.items() for key, values in ui.items()
                if key in PREVIEWABLE for entry in values if isinstance(entry, dict)]
    workflow = (item.extra_data.get("extra_pnginfo") or {}).get("workflow") or {}
    preview = None
    if previews:
        node, key, entry = previews[0]
        preview = {**{k: entry[k] for k in ("filename", "subfolder", "type") if k in entry},
                   "nodeId": node, "mediaType": key}
    return {
        "id": item.prompt_id,
        "status": status,
        "priority": item.number,
        "create_time": item.create_time,
        "execution_start_time": item.start_time,
        "execution_end_time": record.end_time if record else None,
        "outputs_count": sum(len(values) for ui in outputs.values() for values in ui.values()),
        "previewable_outputs_count": len(previews),
        "preview_output": preview,
        "execution_error": _error(record),
        "workflow_id": workflow.get("id") if isinstance(workflow, dict) else None,
    }


def _error(record: HistoryRecord | None) -> dict | None:
    if record is None or record.result.status != "error":
        return None
    for event, data in record.result.messages:
        if event == "execution_error" and isinstance(data.get("node_id"), str):
            return {key: data[key] for key in ("node_id", "node_type", "exception_message", "exception_type",
                                               "traceback", "prompt_id", "timestamp", "executed")}
    return None


def _status(record: HistoryRecord) -> str:
    return {"success": "completed", "error": "failed", "interrupted": "cancelled"}[record.result.status]


def _all_jobs(request: web.Request) -> list[tuple[dict, HistoryRecord | None]]:
    """Every job, newest first, with its history record where it has one."""
    queue = request.app[STATE].queue
    running, pending = queue.snapshot()
    jobs = [(_job(item, "pending"), None) for item in reversed(pending)]
    jobs += [(_job(item, "in_progress"), None) for item in running]
    jobs += [(_job(r.item, _status(r), r), r) for r in reversed(queue.history_records())]
    return jobs


@routes.get("/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    wanted = set(request.query.get("status", ",".join(STATUSES)).split(","))
    unknown = wanted - set(STATUSES)
    if unknown:
        return web.json_response({"error": f"unknown status {sorted(unknown)}; use any of {STATUSES}"}, status=400)
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        return web.json_response({"error": "limit and offset must be integers"}, status=400)
    if limit < 0 or offset < 0:
        return web.json_response({"error": "limit and offset must be >= 0"}, status=400)
    jobs = [job for job, _ in _all_jobs(request) if job["status"] in wanted]
    workflow_id = request.query.get("workflow_id")
    if workflow_id:
        jobs = [job for job in jobs if job["workflow_id"] == workflow_id]
    page = jobs[offset:offset + limit]
    return json_response({"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": len(jobs),
                                                           "has_more": offset + len(page) < len(jobs)}})


@routes.get("/jobs/{id}")
async def job_detail(request: web.Request) -> web.Response:
    job_id = request.match_info["id"]
    for job, record in _all_jobs(request):
        if job["id"] == job_id:
            return json_response(_detail(request, job, record))
    return web.json_response({"error": f"no job {job_id!r}"}, status=404)


def _detail(request: web.Request, job: dict, record: HistoryRecord | None) -> dict:
    queue = request.app[STATE].queue
    running, pending = queue.snapshot()
    item = record.item if record else next(i for i in running + pending if i.prompt_id == job["id"])
    detail = {**job, "workflow": {"prompt": item.prompt, "extra_data": item.extra_data},
              "outputs": record.result.outputs if record else {}}
    if record:
        detail["execution_status"] = record.as_history()["status"]
    return detail


def _cancel(request: web.Request, job_id: str) -> bool:
    queue = request.app[STATE].queue
    running, pending = queue.snapshot()
    if any(item.prompt_id == job_id for item in pending):
        queue.delete([job_id])
        return True
    return queue.interrupt(job_id)


@routes.post("/jobs/{id}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    return web.json_response({"cancelled": _cancel(request, request.match_info["id"])})


@routes.post("/jobs/cancel")
async def cancel_jobs(request: web.Request) -> web.Response:
    body = await read_json(request)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return web.json_response({"error": "job_ids must be a list of strings"}, status=400)
    return web.json_response({"cancelled": [i for i in ids if _cancel(request, i)]})
