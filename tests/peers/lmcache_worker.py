"""LMCache 0.5.6's own worker link (LMCacheWorker, the part of an LMCache engine that talks to a controller), driven
from a test: run with the LMCache side venv's python (scripts/lmcache_venv.sh). It registers with the controller
at the given pull and reply URLs; then, per stdin line, {"admit": [token ids]} or {"evict": [token ids]} sends
the chunks of those tokens as LMCache's engine reports them (its ChunkedTokenDatabase's hashes in a
BatchedKVOperationMsg, through the worker's own queue), {"close": true} deregisters. Prints "ready" once it is
registered and one "ok" line per request."""

import json
import sys
import time

import torch
from lmcache.v1.cache_controller.message import BatchedKVOperationMsg, KVOpEvent, OpType
from lmcache.v1.cache_controller.worker import LMCacheWorker
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.token_database import ChunkedTokenDatabase

pull, reply, instance_id, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = LMCacheEngineConfig.from_dict(
    {
        "chunk_size": 256,
        "enable_controller": True,
        "lmcache_instance_id": instance_id,
        "controller_pull_url": pull,
        "controller_reply_url": reply,
        "lmcache_worker_ports": [port],
    }
)
metadata = LMCacheMetadata(
    model_name="smollm2", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0, kv_dtype=torch.float16, kv_shape=(30, 2, 256, 3, 64)
)
worker = LMCacheWorker(config, metadata, None)  # the engine is only asked for control messages, which this test sends none of
time.sleep(0.5)  # its thread registers first
print("ready", flush=True)
database = ChunkedTokenDatabase()
seq = 0
for line in sys.stdin:
    request = json.loads(line)
    if request.get("close"):
        worker.deregister()
        time.sleep(0.5)  # close() stops the worker's loop at once: let the DeRegisterMsg go out first
        worker.close()
        print(json.dumps("ok"), flush=True)
        break
    op, tokens = (OpType.ADMIT, request["admit"]) if "admit" in request else (OpType.EVICT, request["evict"])
    events = []
    for _, _, chunk_hash in database.process_tokens(tokens, make_key=False):
        events.append(KVOpEvent(op_type=op, key=chunk_hash, seq_num=seq))
        seq += 1
    worker.put_msg(BatchedKVOperationMsg(instance_id=instance_id, worker_id=0, location="LocalCPUBackend", operations=events))
    print(json.dumps("ok"), flush=True)
