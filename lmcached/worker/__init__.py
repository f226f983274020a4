"""A worker: the storage of one instance (RAM arena, disk, the shared Redis tier, write-behind, kvtc codebooks),
its data plane (TCP frames and same-host shared memory), the commands the controller runs on it, and its link to
the controller."""

from lmcached.worker.instance import Worker, new_worker_id

__all__ = ["Worker", "new_worker_id"]
