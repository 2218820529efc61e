"""An agent stream in its own process: prints each response as a JSON line, acks it.

python -m tests.helpers.sync_printer ADDRESS SERVICE INSTANCE_ID
"""

from __future__ import annotations

import asyncio
import json
import sys

from tests.helpers.raw_agent import RawAgent, _revision


async def main(address: str, service: str, instance_id: str) -> None:
    async with RawAgent(address, service, instance_id) as agent:
        while True:
            response = await agent.next(within=3600)
            kind = response.WhichOneof("message")
            flags = {}
            if kind == "snapshot":
                flags = {f.name: f.value.string_value[:20] for f in response.snapshot.flags}
            elif kind == "change":
                flags = {f.name: f.value.string_value[:20] for f in response.change.flags_set}
            line = {"kind": kind, "revision": _revision(response), "flags": flags}
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
