"""TLS in front of the test's offload llama-server (built here without OpenSSL).

A real offload endpoint (a GPU server, a serverless API) speaks HTTPS; this makes
the test's one do so too, so the gateway's ``ssl verify required`` path with SNI
and its CA file is exercised. It forwards bytes only: HTTP stays llama-server's.
Runs as the offload container's main process with the image's python3 (stdlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    upstream_host, upstream_port = args.upstream.rsplit(":", 1)

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(upstream_host, int(upstream_port))
        except OSError:
            client_writer.close()
            return
        upstream_reader, upstream_writer = upstream
        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))

    server = await asyncio.start_server(handle, "0.0.0.0", args.port, ssl=context)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the plain HTTP server")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
