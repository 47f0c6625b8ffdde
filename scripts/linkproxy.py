#!/usr/bin/env python3
"""A slow network link between the benchmark's clients and its local servers.

    linkproxy.py --rtt-ms 20 --mbit 100 --ready-file F 0:9000 0:8080

One process forwards every LISTEN:UPSTREAM pair (TCP, 127.0.0.1 on both ends;
LISTEN 0 picks a free port). Once it listens it writes one "LISTEN UPSTREAM" line per
pair to the ready file (atomically: the file appears complete or not at all). Every
connection through every port crosses the same link, so transfers share it the way a
home or office uplink is shared. SIGTERM or SIGINT stops it.

What is modelled:
- propagation: each chunk read at time t is delivered no earlier than t + RTT/2, in
  both directions, so a request/response exchange on an open connection costs one RTT;
- the TCP handshake: a new connection forwards nothing until one RTT after it was
  accepted (the client's SYN and the SYN-ACK), so its first exchange costs two RTTs;
- a bottleneck of --mbit in each direction, shared by all connections: one FIFO
  serialiser per direction (a chunk leaves when the link has sent everything queued
  before it), as at a drop-tail router; order is kept within a connection;
- bounded buffering: a connection stops reading its source while more than the
  bandwidth-delay product + 256 KiB of it is queued on the link, so a fast sender
  is held back by the link (TCP-like backpressure) and memory stays small;
- half-closes (EOF is passed on as shutdown(SHUT_WR) after the data queued before it
  is delivered) and resets (passed on as an RST, also after the queued data).

What is not modelled: packet loss and retransmission, TCP slow start and congestion
control (a new connection gets its share of the link from its first byte, which is
kinder to many short connections than a real network), fair queueing between
connections, jitter, per-packet header overhead, TLS (the benchmark's servers speak
plain HTTP) and DNS. Delays are asyncio timers: about a millisecond of slack.

--rtt-ms 0 --mbit 0 is a plain pass-through.

With --count-file F, SIGUSR1 writes there (atomically) one "UPSTREAM DOWN UP" line per
pair: the bytes that crossed the link so far towards the client and towards the server.
"""

import argparse
import asyncio
import collections
import functools
import os
import signal
import socket
import struct
import sys

HOST = "127.0.0.1"
CHUNK = 32 * 1024  # per read: 2.6 ms of a 100 Mbit/s link, small enough to interleave
SLACK = 256 * 1024  # queued per connection beyond the bandwidth-delay product
EOF = object()  # queue markers, after the data chunks (bytes)
RESET = object()


def log(msg):
    print(f"linkproxy: {msg}", file=sys.stderr, flush=True)


class Link:
    """One direction of the link: a FIFO serialiser shared by every connection."""

    def __init__(self, bytes_per_s, delay):
        self.rate = bytes_per_s  # 0: no cap
        self.delay = delay  # one-way propagation, seconds
        self.free_at = 0.0  # loop time at which the link has sent all it was given

    def arrival(self, now, n):
        """When n bytes handed to the link at `now` reach the far end."""
        if not self.rate:
            return now + self.delay
        self.free_at = max(now, self.free_at) + n / self.rate
        return self.free_at + self.delay


def reset(writer):
    """Closes with an RST (SO_LINGER 0) rather than a FIN."""
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class Pipe:
    """One direction of one connection: src -> link -> dst."""

    def __init__(self, link, src, dst, limit, counts, way):
        self.link, self.src, self.dst, self.limit = link, src, dst, limit
        self.counts, self.way = counts, way  # counts[way] += bytes that crossed
        self.queue = collections.deque()  # (arrival time, chunk | EOF | RESET)
        self.queued = 0  # bytes in the queue
        self.last = 0.0  # arrival time of the last item queued
        self.dead = False  # dst failed: nothing more will be delivered
        self.space = asyncio.Event()  # queued <= limit, or dead
        self.items = asyncio.Event()  # the queue is not empty

    def put(self, at, item):
        self.last = max(self.last, at)
        self.queue.append((self.last, item))
        if isinstance(item, bytes):
            self.queued += len(item)
        self.items.set()

    async def read(self):
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.queued > self.limit and not self.dead:
                    self.space.clear()
                    await self.space.wait()
                if self.dead:
                    return
                data = await self.src.read(CHUNK)
                if not data:
                    break
                self.counts[self.way] += len(data)
                self.put(self.link.arrival(loop.time(), len(data)), data)
            self.put(loop.time() + self.link.delay, EOF)
        except OSError:  # ConnectionResetError and the like
            self.put(loop.time() + self.link.delay, RESET)

    async def write(self, other_end):
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.items.clear()
                    await self.items.wait()
                at, item = self.queue[0]
                if at > loop.time():
                    await asyncio.sleep(at - loop.time())
                self.queue.popleft()
                if item is RESET:
                    reset(self.dst)
                    return
                if item is EOF:
                    if self.dst.can_write_eof():
                        self.dst.write_eof()
                    return
                self.dst.write(item)
                await self.dst.drain()
                self.queued -= len(item)
                if self.queued <= self.limit:
                    self.space.set()
        except (OSError, RuntimeError):
            # dst is gone: its peer would answer our sender with an RST
            self.dead = True
            self.queue.clear()
            self.queued = 0
            self.space.set()
            reset(self.dst)
            reset(other_end)


class Net:
    """The link: one serialiser per direction, and the per-connection queue limit."""

    def __init__(self, mbit, rtt):
        rate = mbit * 1e6 / 8
        self.rtt = rtt
        self.up = Link(rate, rtt / 2)  # client -> server
        self.down = Link(rate, rtt / 2)  # server -> client
        self.limit = int(rate * rtt) + SLACK
        self.tasks = set()  # open connections, cancelled at shutdown
        self.counts = collections.defaultdict(lambda: [0, 0])  # upstream: [down, up]


async def connection(net, upstream, client_r, client_w):
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    me = asyncio.current_task()
    net.tasks.add(me)
    up_w = None
    try:
        try:
            up_r, up_w = await asyncio.open_connection(HOST, upstream)
        except OSError as e:
            log(f"cannot connect to {HOST}:{upstream}: {e}")
            reset(client_w)
            return
        await asyncio.sleep(max(0.0, accepted + net.rtt - loop.time()))  # the handshake
        counts = net.counts[upstream]
        up = Pipe(net.up, client_r, up_w, net.limit, counts, 1)
        down = Pipe(net.down, up_r, client_w, net.limit, counts, 0)
        # a TaskGroup: should one of the four fail unexpectedly, the others are cancelled
        async with asyncio.TaskGroup() as tg:
            tg.create_task(up.read())
            tg.create_task(up.write(other_end=client_w))
            tg.create_task(down.read())
            tg.create_task(down.write(other_end=up_w))
    except asyncio.CancelledError:
        pass  # shutting down
    except Exception as e:  # never let one connection take the proxy down
        log(f"connection to port {upstream}: {e!r}")
    finally:
        for w in (client_w, up_w):
            if w is not None:
                w.close()
        net.tasks.discard(me)


def write_counts(net, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for upstream, (down, up) in sorted(net.counts.items()):
            f.write(f"{upstream} {down} {up}\n")
    os.rename(tmp, path)


def pair(s):
    listen, _, upstream = s.partition(":")
    try:
        return int(listen), int(upstream)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not LISTEN:UPSTREAM: {s!r}") from None


async def main(args):
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: log(ctx.get("message", "error")))
    net = Net(args.mbit, args.rtt_ms / 1000)
    servers, lines = [], []
    for listen, upstream in args.pairs:
        server = await asyncio.start_server(
            functools.partial(connection, net, upstream), HOST, listen
        )
        servers.append(server)
        lines.append(f"{server.sockets[0].getsockname()[1]} {upstream}\n")
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp"
        with open(tmp, "w") as f:
            f.writelines(lines)
        os.rename(tmp, args.ready_file)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.count_file:
        loop.add_signal_handler(signal.SIGUSR1, write_counts, net, args.count_file)
    await stop.wait()
    for server in servers:
        server.close()
    for t in list(net.tasks):
        t.cancel()
    await asyncio.gather(*net.tasks, return_exceptions=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt-ms", type=float, default=0, help="round-trip time (default 0)")
    p.add_argument("--mbit", type=float, default=0, help="link rate each way, Mbit/s (0: no cap)")
    p.add_argument("--ready-file", help='write "LISTEN UPSTREAM" lines here once listening')
    p.add_argument("--count-file", help="on SIGUSR1, write the bytes each pair carried here")
    p.add_argument("pairs", nargs="+", type=pair, metavar="LISTEN:UPSTREAM")
    asyncio.run(main(p.parse_args()))
