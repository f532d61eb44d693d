"""The Starlette app of `longcat-i2v serve`: pages, the objects they show, the preview queue."""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from longcat_job.lora_files import PEFT_CONFIG, PEFT_WEIGHTS
from longcat_job.storage import LocalStore, ObjectStore
from longcat_job.validation_grid import weights_shown

from . import pages
from .jobs import Job, cluster_job, cluster_jobs, job_of_location, jobs_of_location
from .objects import object_response
from .preview_queue import Generate, PreviewQueue, PreviewTask
from .preview_request import FieldProblem, Refused, check_image, parse_form, settings, uploaded_image

log = logging.getLogger(__name__)


def plotly_js() -> Path | None:
    """plotly.min.js from the installed plotly wheel (its package data), found without importing plotly."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


class Server:
    def __init__(self, output: ObjectStore | None, *, model: str | None, custom_objects: Any = None,
                 generate: Generate, unavailable: Callable[[str | None], str | None]) -> None:
        self.output, self.model, self.custom_objects = output, model, custom_objects
        self.unavailable = functools.cache(unavailable)
        self.videos = Path(tempfile.mkdtemp(prefix="longcat-previews-"))
        self.queue = PreviewQueue(generate, self.videos)

    def jobs(self) -> tuple[list[Job], list[str]]:
        found, notes = [], []
        if self.output is not None:
            found += jobs_of_location(self.output)
        if self.custom_objects is not None:
            try:
                found += cluster_jobs(self.custom_objects)
            except Exception as exc:  # RBAC or API server trouble: the output location's jobs still show
                notes.append(f"cannot list the cluster's LongCatI2VJobs: {exc}")
        return found, notes

    def job(self, job_id: str) -> Job | None:
        if ":" in job_id and self.custom_objects is not None:  # namespace:name
            return cluster_job(self.custom_objects, job_id)
        return job_of_location(self.output, job_id) if self.output is not None else None

    def job_of(self, request: Request) -> Job:
        """The job the route's path names; a 404 page when this server has no such job."""
        job = self.job(request.path_params["job_id"])
        if job is None:
            raise HTTPException(404, "no such job here; see the list at /")
        return job

    def model_of(self, job: Job) -> str | None:
        spec = job.spec()
        return self.model or (spec.spec.model.source if spec else None)

    # Routes. Plain functions run in Starlette's thread pool: the stores' reads block.
    def job_list(self, request: Request) -> Response:
        jobs, notes = self.jobs()
        if self.output is None and self.custom_objects is None:
            notes.append("no output location and no cluster: start with --output DIR|s3://BUCKET/PREFIX")
        rows = [(j.id, pages.summary(j.progress(), j.cluster_status)) for j in jobs]
        return HTMLResponse(pages.job_list(rows, notes))

    def job_page(self, request: Request) -> Response:
        job = self.job_of(request)
        spec = job.spec()
        return HTMLResponse(pages.job_page(job.id, pages.summary(job.progress(), job.cluster_status),
                                           job.validation_entries(), job.loras(),
                                           weights_shown(spec.spec.training.ema) if spec else None))

    def loss(self, request: Request) -> Response:
        job = self.job_of(request)
        return Response(job.loss().to_json(), media_type="application/json")

    def file(self, request: Request) -> Response:
        job = self.job_of(request)
        return object_response(job.store, request.path_params["key"], request,
                               download="download" in request.query_params)

    def preview_page(self, request: Request) -> Response:
        job = self.job_of(request)
        return HTMLResponse(pages.preview_page(job.id, job.validation(), job.loras(), job.start_frames(),
                                               self.unavailable(self.model_of(job))))

    async def submit(self, request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        try:
            task = await run_in_threadpool(self.task_of, payload)
        except Refused as refused:
            return JSONResponse({"errors": [p.model_dump() for p in refused.problems]}, status_code=422)
        return JSONResponse({"id": self.queue.submit(task)})

    def task_of(self, payload: object) -> PreviewTask:
        """The request checked against the job: refused before it is queued, naming the field."""
        form = parse_form(payload)
        job = self.job(form.job)
        if job is None:
            raise Refused([FieldProblem(field="job", message=f"no job {form.job!r} here")])
        model = self.model_of(job)
        if (reason := self.unavailable(model)) is not None:
            raise Refused([FieldProblem(field="(preview)", message=f"the preview is disabled: {reason}")])
        spec = settings(form, job.validation())
        if form.image:
            image, name = uploaded_image(form.image), "the uploaded start frame"
        elif form.sample:
            if form.sample not in {s["key"] for s in job.start_frames()}:
                raise Refused([FieldProblem(field="sample", message="not one of this job's validation start frames")])
            image, name = job.store.get_bytes(form.sample), form.sample
            check_image(image, "sample")
        else:
            raise Refused([FieldProblem(field="image", message="upload a start frame or pick one of the job's")])
        lora_files = None
        if form.lora:
            if form.lora not in job.loras():
                raise Refused([FieldProblem(field="lora", message=f"{form.lora!r} is not a LoRA folder of this job")])
            lora_files = {name: job.store.get_bytes(form.lora + name) for name in (PEFT_WEIGHTS, PEFT_CONFIG)}
        assert model is not None  # unavailable(None) gives a reason
        return PreviewTask(model, image, name, form.prompt, spec, lora_files, form.lora_strength)

    def preview_status(self, request: Request) -> Response:
        preview_id = request.path_params["preview_id"]
        status = self.queue.statuses.get(preview_id)
        if status is None:
            error = (f"no preview {preview_id}: the server restarted, or it is one of the older previews it no "
                     f"longer keeps (the last {self.queue.keep_finished})")
            return JSONResponse({"state": "failed", "error": error}, status_code=404)
        eta = status.eta()
        return JSONResponse({"state": status.state, "place": self.queue.place(preview_id), "done": status.done,
                             "total": status.total, "eta": eta, "error": status.error, "seconds": status.seconds,
                             "video": f"/previews/{preview_id}.mp4" if status.state == "done" else None})

    def preview_video(self, request: Request) -> Response:
        return object_response(LocalStore(self.videos), f"{request.path_params['preview_id']}.mp4", request,
                               download="download" in request.query_params)

    def plotly(self, request: Request) -> Response:
        path = plotly_js()
        if path is None:
            return PlainTextResponse("plotly is not installed: pip install 'longcat-i2v[ui]'", status_code=404)
        return FileResponse(path, media_type="text/javascript")

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/", self.job_list),
            Route("/jobs/{job_id}", self.job_page),
            Route("/jobs/{job_id}/loss.json", self.loss),
            Route("/jobs/{job_id}/preview", self.preview_page),
            Route("/jobs/{job_id}/files/{key:path}", self.file),
            Route("/api/preview", self.submit, methods=["POST"]),
            Route("/api/preview/{preview_id}", self.preview_status),
            Route("/previews/{preview_id}.mp4", self.preview_video),
            Route("/static/plotly.min.js", self.plotly),
        ])
