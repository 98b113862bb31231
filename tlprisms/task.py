"""Tasks: one prism over many prompts, streamed in batches (see :func:`explain_task`).

>>> from tlprisms.task import TaskResult, TaskStats, explain_task
"""

from tlprisms._tasks.task import TaskResult, TaskStats, explain_task

__all__ = ["TaskResult", "TaskStats", "explain_task"]
