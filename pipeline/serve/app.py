"""The FastAPI app: LightX2V's routes, paths and status codes (lightx2v/server/api/), with a
request checked before it is queued (``requests.py``) and one worker thread running the tasks.

Errors are ``{"detail": <one line>, "field": <the request field>}`` (``field`` where a field is
at fault): 400 a bad value, 403 a path reaching outside ``--lora_dir`` / ``--output_dir``, 404 a
missing LoRA, task or result, 409 a ``task_id`` already in use, 422 a body that does not parse,
503 a full queue.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations."""

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from .requests import BadRequest, Context, plan_request
from .schema import StopTaskResponse, TaskResponse, VideoTaskRequest
from .tasks import ACTIVE, DuplicateTask, Full, Task, TaskManager
from .worker import Worker


def create_app(context: Context, tasks: TaskManager) -> FastAPI:
    worker = Worker(context.runtime, tasks)
    spec = context.runtime.spec

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        tasks.stop()  # cancels what is queued or running: the worker ends at its next step
        worker.join(timeout=60)

    app = FastAPI(title="loraforge serve", lifespan=lifespan)

    @app.exception_handler(BadRequest)
    def bad_request(request: Request, error: BadRequest):
        return JSONResponse({"detail": error.message, "field": error.field}, error.status)

    @app.exception_handler(RequestValidationError)
    def unreadable(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        field = ".".join(where) or None
        message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
        return JSONResponse({"detail": message, "field": field}, 422)

    def not_found(detail: str, status: int = 404):
        return JSONResponse({"detail": detail}, status)

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/docs")

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/tasks/video/", response_model=TaskResponse)
    def create_video_task(message: VideoTaskRequest):
        plan = plan_request(message, context)
        try:
            tasks.add(Task(message.task_id, plan))
        except DuplicateTask as e:
            raise BadRequest("task_id", str(e), 409) from None
        except Full as e:
            return JSONResponse({"detail": str(e)}, 503)
        return TaskResponse(
            task_id=message.task_id, task_status="pending", save_result_path=plan.save_result_path
        )

    @app.get("/v1/tasks/")
    def list_tasks():
        with tasks.lock:
            return {task_id: task.status_dict() for task_id, task in tasks.tasks.items()}

    @app.get("/v1/tasks/queue/status")
    def queue_status():
        with tasks.lock:
            active = tasks.active()
            return {
                "is_processing": tasks.current is not None,
                "current_task": tasks.current,
                "pending_count": len(tasks.queue),
                "active_count": active,
                "queue_size": tasks.max_queue_size,
                "queue_available": tasks.max_queue_size - active,
            }

    @app.get("/v1/tasks/{task_id}/status")
    def task_status(task_id: str):
        task = tasks.get(task_id)
        if task is None:
            return not_found("Task not found")
        with tasks.lock:
            return task.status_dict()

    @app.get("/v1/tasks/{task_id}/result")
    def task_result(task_id: str):
        task = tasks.get(task_id)
        if task is None:
            return not_found("Task not found")
        if task.status != "completed":
            return not_found("Task not completed")
        path = task.plan.output
        if not os.path.isfile(path):
            return not_found(f"File not found: {task.plan.save_result_path}")
        return FileResponse(path, media_type="video/mp4", filename=os.path.basename(path))

    @app.delete("/v1/tasks/all/running", response_model=StopTaskResponse)
    def stop_all():
        with tasks.lock:
            active = [task_id for task_id, t in tasks.tasks.items() if t.status in ACTIVE]
            for task_id in active:
                tasks.cancel(task_id)
        if not active:
            return StopTaskResponse(stop_status="do_nothing", reason="No running tasks found.")
        return StopTaskResponse(stop_status="success", reason=f"{len(active)} tasks stopped.")

    @app.delete("/v1/tasks/{task_id}", response_model=StopTaskResponse)
    def stop_task(task_id: str):
        if tasks.cancel(task_id):
            return StopTaskResponse(stop_status="success", reason="Task stopped successfully.")
        return StopTaskResponse(
            stop_status="do_nothing", reason="Task not found or already completed."
        )

    @app.get("/v1/service/status")
    def service_status(weights_digest: bool = False):
        with tasks.lock:
            status = {
                "service_status": "busy" if tasks.current else "idle",
                "current_task": tasks.current,
                "active_tasks": [
                    t for t, task in tasks.tasks.items() if task.status == "processing"
                ],
                "pending_tasks": len(tasks.queue),
                "queue_size": tasks.max_queue_size,
                "total_tasks": tasks.counts["total"],
                "completed_tasks": tasks.counts["completed"],
                "failed_tasks": tasks.counts["failed"],
            }
        status["current_loras"] = context.runtime.loras.applied()
        status["held_bytes"] = context.runtime.loras.held_bytes
        if weights_digest:  # waits for the running task: the bytes between tasks
            status["weights_digest"] = worker.weights_digest()
        return status

    @app.get("/v1/service/metadata")
    def metadata():
        return {
            "nproc_per_node": 1,
            "model_cls": spec.model.name,
            "task": spec.task,
            "model_path": spec.folder.path,
            "device": spec.device,
            "dtype": spec.dtype,
        }

    return app
