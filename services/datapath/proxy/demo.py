"""The Star Wars demo's deathstar: ``POST /v1/request-landing`` -> "Ship landed",
``PUT /v1/exhaust-port`` -> the panic the real demo answers with. Tiny, keep-alive aware.

``python -m services.datapath.proxy.demo HOST PORT`` serves it (the privileged tests run it
inside a pod namespace).
"""

from __future__ import annotations

import asyncio
import sys

from services.datapath.proxy.core.http import Body, End, Head, ParseError, Parser, response_bytes

LANDED = b"Ship landed\n"
PANIC = (b"Panic: deathstar exploded\n\ngoroutine 1 [running]:\nmain.HandleGarbage(0x2080c3f50,"
         b" 0x2, 0x4, 0x425c0, 0x5, 0xa)\n        /code/src/github.com/empire/deathstar/\n"
         b"        temp/main.go:9 +0x64\nmain.main()\n        /code/src/github.com/empire/"
         b"deathstar/temp/main.go:5 +0x85\n")
ROUTES: dict[tuple[str, str], tuple[int, str, bytes]] = {
    ("POST", "/v1/request-landing"): (200, "OK", LANDED),
    ("PUT", "/v1/exhaust-port"): (503, "Service Unavailable", PANIC),
    ("GET", "/v1"): (200, "OK", b'{"name": "Death Star", "class": "Deep Space Mobile '
                                b'Battlestation"}\n'),
}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    parser = Parser()
    head: Head | None = None
    try:
        while data := await reader.read(65536):
            for ev in parser.feed(data):
                if isinstance(ev, Head):
                    head = ev
                elif isinstance(ev, End) and head is not None:
                    status, reason, body = ROUTES.get((head.method, head.target.split("?")[0]),
                                                      (404, "Not Found", b"Not Found\n"))
                    writer.write(response_bytes(status, reason, body,
                                                keep_alive=head.keep_alive))
                    await writer.drain()
                    if not head.keep_alive:
                        return
                elif isinstance(ev, Body):
                    pass
    except (ParseError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_deathstar(host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(_serve, host, port, reuse_address=True)


async def _main(host: str, port: int) -> None:
    server = await serve_deathstar(host, port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2])))
