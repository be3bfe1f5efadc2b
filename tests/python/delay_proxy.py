"""A TCP proxy that delays every byte by a fixed time in each direction, without
limiting throughput: a slow link for the network-fault tests (netem is not available
here). Run inside a worker's network namespace:

    python delay_proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_MS [LATER_MS]

With LATER_MS, SIGUSR1 switches the delay to LATER_MS: a link that turns slow.
"""
import asyncio
import signal
import sys
import time


DELAY = [0.0]  # seconds; a list so the signal handler can change it


async def pipe(reader, writer):
    """Copies reader to writer, each chunk written DELAY after it arrived, in order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read():
        while chunk := await reader.read(65536):
            await queue.put((time.monotonic() + DELAY[0], chunk))
        await queue.put((0.0, b""))

    async def write():
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def main(listen, target, later):
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw), return_exceptions=True)

    if later is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: DELAY.__setitem__(0, later))
    server = await asyncio.start_server(handle, lhost, int(lport))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    DELAY[0] = float(sys.argv[3]) / 1000
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else None))
