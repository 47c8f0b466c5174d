"""jobgate's Python worker runtime.

    from worker import Fatal, JobContext, Worker

    app = Worker()

    @app.handler("resize")
    async def resize(job: JobContext) -> dict:
        if "width" not in job.args:
            raise Fatal("args.width is missing")  # fails for good; other exceptions are retried
        return {"width": job.args["width"] // 2}

Run it with ``python -m worker --app mymodule:app``.
"""

from .config import WorkerSettings
from .registry import Fatal, JobContext
from .runtime import Worker

__all__ = ["Fatal", "JobContext", "Worker", "WorkerSettings"]
