"""A tiny agnhost-like server run inside a dev-mode pod: one process serving all its ports.

TCP: answers every connection with the pod's name, then echoes. UDP: echoes each datagram.
``--http-demo PORT`` serves the Star Wars deathstar's HTTP routes on a TCP port instead (dev
mode runs it for pods of the demo's image, see ``sandbox.SIMULATED_IMAGES``). Prints ``ready``
on stdout once every socket is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import cast

from services.datapath.proxy.demo import serve_deathstar


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def serve(name: str, tcp: list[int], udp: list[int], http_demo: list[int]) -> None:
    reply = f"{name}\n".encode()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(reply)
            await writer.drain()
            # Keep the connection while the client talks (echo), close on EOF.
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    servers = [await asyncio.start_server(on_conn, "0.0.0.0", p, reuse_address=True)
               for p in tcp if p not in http_demo]
    servers += [await serve_deathstar("0.0.0.0", p) for p in http_demo]
    for p in udp:
        await loop.create_datagram_endpoint(_Echo, local_addr=("0.0.0.0", p))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.gather(*(s.serve_forever() for s in servers), asyncio.Event().wait())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="pod")
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--http-demo", type=int, action="append", default=[])
    args = ap.parse_args(argv)
    asyncio.run(serve(args.name, args.tcp, args.udp, args.http_demo))


if __name__ == "__main__":
    main()
