"""LMCache 0.5.6's own controller (LMCacheControllerManager, as `lmcache controller` and vLLM production-stack's
kvaware router run it), driven from a test: run with the LMCache side venv's python (scripts/lmcache_venv.sh),
never the project's. Prints "ready" once its sockets are bound, then answers one JSON request per stdin line
with one JSON line: {"lookup": [token ids]} -> LookupRetMsg.layout_info, {"query_inst": ip} -> the instance id,
{"workers": instance_id} -> the registered worker ids."""

import asyncio
import json
import sys

from lmcache.v1.cache_controller.controller_manager import LMCacheControllerManager
from lmcache.v1.cache_controller.message import LookupMsg, QueryInstMsg, QueryWorkerInfoMsg


async def main(pull: str, reply: str) -> None:
    manager = LMCacheControllerManager({"pull": pull, "reply": reply, "heartbeat": None}, 0, 60)
    serving = asyncio.create_task(manager.start_all())
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        request = json.loads(line)
        if "lookup" in request:
            answer = (await manager.handle_orchestration_message(LookupMsg(event_id="t", tokens=request["lookup"]))).layout_info
        elif "query_inst" in request:
            answer = (await manager.handle_orchestration_message(QueryInstMsg(event_id="t", ip=request["query_inst"]))).instance_id
        else:
            ret = await manager.handle_orchestration_message(
                QueryWorkerInfoMsg(event_id="t", instance_id=request["workers"], worker_ids=None)
            )
            answer = sorted(info.worker_id for info in ret.worker_infos)
        print(json.dumps(answer), flush=True)
    serving.cancel()


asyncio.run(main(sys.argv[1], sys.argv[2]))
