"""jobgate's Python worker runtime.

    from worker import Worker, JobContext

    app = Worker()

    @app.handler("resize")
    async def resize(job: JobContext) -> dict:
        return {"width": job.args["width"] // 2}

Run it with ``python -m worker --app mymodule:app``.
"""

from .config import WorkerSettings
from .registry import JobContext
from .runtime import Worker

__all__ = ["JobContext", "Worker", "WorkerSettings"]
