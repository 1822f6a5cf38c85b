"""Batched UDP I/O for the loops: recvmmsg/sendmmsg through ctypes, UDP GRO and GSO.

Linux only. `load()` returns None where it can't work (another system, a libc
without the symbols, UDP_TUNNEL_PLAIN=1 in the environment); the loops then use
plain socket calls. Nothing here knows the protocol: a `Ring` receives up to
RING datagrams in one call (with the sender's address and, with UDP_GRO, the
segment size of a coalesced run) and sends them on from where they lie, in
one sendmmsg, runs of equal-size datagrams to one destination as one
UDP_SEGMENT (GSO) message; a `Batch` collects datagrams from a ring one by
one for a send of their own (the inside agent's tunnel side, where control
messages sit between data).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable

RING = 64  # datagrams per receive call
SLOT = 65536  # a datagram, or a GRO run of one flow, fits in a slot
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
MSG_DONTWAIT = 0x40
MSG_WAITFORONE = 0x10000
GSO_MAX_SEGS = 64  # UDP_MAX_SEGMENTS of older kernels
GSO_MAX_BYTES = 65000  # a GSO message must fit one IP datagram's length field
NAME = 32  # bytes kept per sockaddr (sockaddr_in6 is 28)
CTRL = 32  # bytes kept per control message buffer (CMSG_SPACE(4) is 24)

# what sendmmsg says of a GSO message the kernel takes none of (no checksum offload, an old
# kernel, a segment above the path MTU)
GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP)

SEG_CMSG_SPACE = 24  # CMSG_SPACE(2): the msg_controllen of a UDP_SEGMENT control message
ANC_SPACE = 64  # ancillary space for recvmsg_into: the UDP_GRO segment size fits


def gro_segment(anc: list) -> int:
    """The segment size in recvmsg's ancillary data (UDP_GRO), 0 for one plain datagram."""
    return int.from_bytes(anc[0][2][:4], sys.byteorder) if anc else 0


def gso_ancillary(seg: int) -> list:
    """The ancillary data for socket.sendmsg that sends a buffer as seg-byte datagrams (GSO)."""
    return [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]


class Switch:
    """Whether to read a socket one datagram per wakeup (cheapest while datagrams come one
    by one: a ctypes call costs more than Python's own receive) or in recvmmsg batches (while
    it stays busy). `busy(flag)` after each single read (flag: it was busy this time, as the
    caller measures it); `batch(n)` after each batch of n. `to_batch` busy single reads in a
    row switch to batches, `to_single` batches of one in a row switch back."""

    __slots__ = ("batched", "streak", "to_batch", "to_single")

    def __init__(self, to_batch: int, to_single: int) -> None:
        self.batched = False
        self.streak = 0
        self.to_batch, self.to_single = to_batch, to_single

    def single(self, busy: bool) -> None:
        if not busy:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.to_batch:
            self.batched, self.streak = True, 0

    def batch(self, n: int) -> None:
        if n != 1:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.to_single:
            self.batched, self.streak = False, 0


# The switch's thresholds: the outside's one socket counts datagrams closer than BUSY_GAP s;
# an inside socket counts wakeups in a row that found it readable.
OUTSIDE_SWITCH = (8, 8)
INSIDE_SWITCH = (2, 4)
BUSY_GAP = 100e-6


def segment_cmsg(buf: ctypes.Array, off: int, seg: int) -> None:
    """Write a UDP_SEGMENT control message at `off`: struct cmsghdr {len = CMSG_LEN(2),
    SOL_UDP, UDP_SEGMENT}, then the u16 segment size."""
    struct.pack_into("=QiiH", buf, off, 18, SOL_UDP, UDP_SEGMENT, seg)

# struct mmsghdr on 64-bit Linux, in 8-byte words: msg_name, msg_namelen, msg_iov, msg_iovlen,
# msg_control, msg_controllen, msg_flags, msg_len. struct iovec: iov_base, iov_len.
MSG_WORDS = 8


class _Lib:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.recvmmsg = libc.recvmmsg
        self.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        self.recvmmsg.restype = ctypes.c_int
        self.sendmmsg = libc.sendmmsg
        self.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self.sendmmsg.restype = ctypes.c_int


_lib: _Lib | None = None


def load() -> _Lib | None:
    """The libc functions, or None where batched I/O can't (or shouldn't) be used."""
    global _lib
    if _lib is not None:
        return _lib
    if (not sys.platform.startswith("linux") or os.environ.get("UDP_TUNNEL_PLAIN")
            or ctypes.sizeof(ctypes.c_void_p) != 8):
        return None
    try:
        _lib = _Lib()
    except (OSError, AttributeError):
        return None
    return _lib


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced runs of one flow on `sock`; False where the kernel refuses."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        return False


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO: a blocking receive returns EAGAIN after this long."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def _addr(buf: ctypes.Array) -> int:
    return ctypes.addressof(buf)


class Ring:
    """RING receive slots with their addresses and GRO segment sizes, filled by one recvmmsg."""

    def __init__(self, lib: _Lib, names: bool) -> None:
        self.lib = lib
        self.data = (ctypes.c_char * (RING * SLOT))()
        self.mv = memoryview(self.data).cast("B")
        self.views = [self.mv[i * SLOT:(i + 1) * SLOT] for i in range(RING)]
        self.iov = (ctypes.c_uint64 * (2 * RING))()
        self.msgs = (ctypes.c_uint64 * (MSG_WORDS * RING))()
        self.names = (ctypes.c_char * (NAME * RING))()
        self.names_mv = memoryview(self.names).cast("B")
        self.ctrl = (ctypes.c_char * (CTRL * RING))()
        self.ctrl_i32 = memoryview(self.ctrl).cast("B").cast("i")
        self.m32 = memoryview(self.msgs).cast("B").cast("I")  # msg_len of slot i: m32[16 * i + 14]
        self.m64 = memoryview(self.msgs).cast("B").cast("Q")
        self.base = base = _addr(self.data)
        iov, msgs = _addr(self.iov), _addr(self.msgs)
        for i in range(RING):
            self.iov[2 * i] = base + i * SLOT
            self.iov[2 * i + 1] = SLOT
            w = MSG_WORDS * i
            if names:
                self.msgs[w] = _addr(self.names) + NAME * i
                self.msgs[w + 1] = NAME
            self.msgs[w + 2] = iov + 16 * i
            self.msgs[w + 3] = 1
            self.msgs[w + 4] = _addr(self.ctrl) + CTRL * i
            self.msgs[w + 5] = CTRL
        self.ptr = msgs
        # the headers as set up here: recv puts back what the kernel or a send in place changed
        self.msgs_b, self.iov_b = memoryview(self.msgs).cast("B"), memoryview(self.iov).cast("B")
        self.msgs0, self.iov0 = memoryview(bytes(self.msgs_b)), memoryview(bytes(self.iov_b))
        self.iov64 = memoryview(self.iov).cast("B").cast("Q")
        self.out = (ctypes.c_uint64 * (MSG_WORDS * RING))()  # send_runs' messages, when runs join slots
        self.out64 = memoryview(self.out).cast("B").cast("Q")
        self.used = 0  # slots the last receive filled

    def recv(self, fd: int, flags: int) -> int:
        """Fill up to RING slots from `fd`: their count, or -errno."""
        used = self.used
        if used:  # a memoryview copy costs a quarter of a ctypes.memmove call
            self.msgs_b[:8 * MSG_WORDS * used] = self.msgs0[:8 * MSG_WORDS * used]
            self.iov_b[:16 * used] = self.iov0[:16 * used]
        n = self.lib.recvmmsg(fd, self.ptr, RING, flags, None)
        if n < 0:
            self.used = 0
            return -ctypes.get_errno()
        self.used = n
        return n

    def length(self, i: int) -> int:
        return self.m32[16 * i + 14]

    def lengths(self, n: int) -> list[int]:
        """The lengths of slots 0..n-1 (a GRO run's whole length)."""
        return self.m32[14:16 * n:16].tolist()

    def runs(self, n: int) -> list[int]:
        """Per slot 0..n-1: non-zero when it holds a GRO run (ancillary data came with it)."""
        return self.m64[5:MSG_WORDS * n:MSG_WORDS].tolist()

    def segment(self, i: int) -> int:
        """The GRO segment size of slot i (0: one plain datagram)."""
        if self.m64[MSG_WORDS * i + 5]:
            return self.ctrl_i32[CTRL // 4 * i + 4]
        return 0

    def name(self, i: int) -> bytes:
        return bytes(self.names_mv[NAME * i:NAME * i + self.m32[16 * i + 2]])

    def senders(self, n: int) -> bytes:
        """The sender addresses of slots 0..n-1, NAME bytes each (slot i's at NAME * i)."""
        return bytes(self.names_mv[:NAME * n])

    def forward(self, i: int, dest: int, n: int) -> None:
        """Send slot i on as it lies: n bytes to the sockaddr at address `dest`, no GSO."""
        self.m64[MSG_WORDS * i] = dest
        self.iov64[2 * i + 1] = n

    def forward_run(self, i: int, dest: int, n: int, seg: int) -> None:
        """Send slot i's GRO run of n bytes on to `dest` as seg-byte datagrams (GSO)."""
        self.forward(i, dest, n)
        if seg < n:
            self.join(i, seg)
        else:
            self.m64[MSG_WORDS * i + 5] = 0

    def sent_segment(self, i: int) -> int:
        """The GSO segment size of message i as it was sent (0: none)."""
        return self.ctrl_i32[CTRL // 4 * i + 4] & 0xFFFF if self.m64[MSG_WORDS * i + 5] else 0

    def sent_dest(self, i: int, alen: int) -> bytes:
        """The raw sockaddr message i was sent to."""
        return ctypes.string_at(self.m64[MSG_WORDS * i], alen)

    def sent_count(self, i: int) -> int:
        return self.m64[MSG_WORDS * i + 3]

    # Forwarding in place (the outside agent): the received slots are sent on as they lie, each
    # with its msg_name pointed at its destination (`m64[MSG_WORDS * i]`, a `dest` pointer) and
    # its length in its iov (`iov64[2 * i + 1]`); a run of equal-size datagrams to one place
    # becomes one GSO message (`join`), so `send` takes slot ranges. `recv` undoes all of it.

    def join(self, head: int, seg: int) -> None:
        """Slot `head` becomes a GSO message of seg-byte segments; `grow` adds the next slot."""
        segment_cmsg(self.ctrl, CTRL * head, seg)
        self.m64[MSG_WORDS * head + 5] = SEG_CMSG_SPACE

    def grow(self, head: int, i: int, n: int) -> None:
        """Slot i (n bytes) joins the GSO message at slot `head`."""
        self.iov64[2 * i + 1] = n
        self.m64[MSG_WORDS * head + 3] += 1

    def send(self, fd: int, start: int, end: int) -> list[tuple[int, int]]:
        """Send the messages in slots start..end-1: those that failed, as (slot, errno)."""
        return [(start + k, err) for k, err in send_messages(self.lib, fd, self.ptr + 8 * MSG_WORDS * start,
                                                             end - start)]

    def send_runs(self, fd: int, n: int, gso_max: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        """Send slots 0..n-1 on the connected socket `fd`, in order, each run of equal-size
        datagrams (the last may be shorter) up to gso_max bytes as one GSO message; 0 turns
        runs off. Returns the bytes, and what failed as (slot, count, segment size, errno)."""
        m32, iov64 = self.m32, self.iov64
        runs = []
        seg = total = nbytes = m32[14]
        head, count, more = 0, 1, 0 < seg <= gso_max  # an empty datagram never joins a run
        iov64[1] = seg
        for i in range(1, n):
            ln = m32[16 * i + 14]
            iov64[2 * i + 1] = ln
            nbytes += ln
            if more and 0 < ln <= seg and count < GSO_MAX_SEGS and total + ln <= GSO_MAX_BYTES:
                count += 1
                total += ln
                more = ln == seg  # a shorter datagram ends the run
                continue
            runs.append((head, count, seg))
            head, count, seg, total, more = i, 1, ln, ln, 0 < ln <= gso_max
        runs.append((head, count, seg))
        if len(runs) == n:  # no run: the slots go as they lie
            ptr = self.ptr
        else:
            o64, ctrl, iov = self.out64, _addr(self.ctrl), _addr(self.iov)
            for k, (i, count, seg) in enumerate(runs):
                w = MSG_WORDS * k
                o64[w + 2] = iov + 16 * i
                o64[w + 3] = count
                if count > 1:
                    segment_cmsg(self.ctrl, CTRL * i, seg)
                    o64[w + 4] = ctrl + CTRL * i
                    o64[w + 5] = SEG_CMSG_SPACE
                else:
                    o64[w + 5] = 0
            ptr = _addr(self.out)
        return nbytes, [(*runs[k], err) for k, err in send_messages(self.lib, fd, ptr, len(runs))]

    def parts(self, i: int, count: int, seg: int) -> list[memoryview]:
        """The datagrams of a message from slot i: `count` slots of one datagram each, or (one
        slot, seg > 0) a GRO run in segments of seg bytes."""
        if count == 1:
            return segments(self.views[i], self.iov64[2 * i + 1], seg)
        return [self.views[j][:self.iov64[2 * j + 1]] for j in range(i, i + count)]


def send_messages(lib: _Lib, fd: int, ptr: int, n: int) -> list[tuple[int, int]]:
    """sendmmsg of the n struct mmsghdr at ptr, each once, going on past one that fails
    (retried after EINTR): those that failed, as (index, errno)."""
    failed = []
    start = 0
    for _ in range(2 * n + 1):  # each round sends, skips or retries once: bounded
        if start >= n:
            break
        sent = lib.sendmmsg(fd, ptr + 8 * MSG_WORDS * start, n - start, 0)
        if sent > 0:
            start += sent
            continue
        err = ctypes.get_errno()
        if err != errno.EINTR:
            failed.append((start, err))
            start += 1
    return failed


def gso_limit(gso_max: int, seg: int, err: int) -> int:
    """The largest segment to make GSO runs of, after the kernel refused a run of seg-byte
    segments with err: below seg when seg was above the path MTU, else 0 (no GSO here)."""
    if err in (errno.EINVAL, errno.EMSGSIZE) and seg > 576:
        return min(gso_max, seg - 1)
    return 0


def sockaddr(addr: tuple, family: int) -> bytes:
    """The raw sockaddr of `addr` for a socket of `family`."""
    if family == socket.AF_INET6:
        host, port = addr[0], addr[1]
        if ":" not in host:
            host = "::ffff:" + host
        flow, scope = (addr[2], addr[3]) if len(addr) >= 4 else (0, 0)
        return (struct.pack("=HH", socket.AF_INET6, socket.htons(port)) + struct.pack("!I", flow)
                + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))
    return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(addr[1]), socket.inet_pton(socket.AF_INET, addr[0]))


class Batch:
    """Datagrams to send with one sendmmsg; equal-size runs to one destination become GSO messages.

    `add(ring, i, n, seg, dst)`: the n bytes in slot i of `ring` (which must stay untouched
    until `send`), a datagram or, with seg > 0, a coalesced run in segments of seg bytes; dst
    is `dest(...)`'s (sockaddr, pointer) or None on a connected socket.
    """

    def __init__(self, lib: _Lib, gso: bool) -> None:
        self.lib = lib
        self.gso_max = SLOT if gso else 0  # largest segment to make GSO runs of (lowered when refused)
        self.iov = (ctypes.c_uint64 * (2 * RING))()
        self.msgs = (ctypes.c_uint64 * (MSG_WORDS * RING))()
        self.ctrl = (ctypes.c_char * (CTRL * RING))()
        self.iov_ptr, self.msgs_ptr, self.ctrl_ptr = _addr(self.iov), _addr(self.msgs), _addr(self.ctrl)
        self.ctrl_u16 = memoryview(self.ctrl).cast("B").cast("H")
        for m in range(RING):
            segment_cmsg(self.ctrl, CTRL * m, 0)
        self.iov64 = memoryview(self.iov).cast("B").cast("Q")
        self.m64 = memoryview(self.msgs).cast("B").cast("Q")
        self.keep: list = []  # per message: [[(view, n)...], seg, dst] for the fallback; keeps dst alive
        self.nmsg = 0
        self.niov = 0
        self.run_dst: object = None  # the open run (the last message): destination, size, bytes
        self.run_size = 0
        self.run_bytes = 0

    def add(self, ring: Ring, i: int, n: int, seg: int, dst: tuple | None) -> None:
        j = self.niov
        if (n and n == self.run_size and dst is self.run_dst and not seg and self.run_bytes + n <= GSO_MAX_BYTES):
            m = self.nmsg - 1
            k = self.keep[m]
            if len(k[0]) < GSO_MAX_SEGS:
                self.iov64[2 * j] = ring.base + SLOT * i
                self.iov64[2 * j + 1] = n
                self.niov = j + 1
                k[0].append((ring.views[i], n))
                w = MSG_WORDS * m
                self.m64[w + 3] += 1
                if not k[1]:  # the run's second datagram: now a GSO message
                    k[1] = n
                    self.ctrl_u16[(CTRL * m + 16) // 2] = n
                    self.m64[w + 4] = self.ctrl_ptr + CTRL * m
                    self.m64[w + 5] = SEG_CMSG_SPACE
                self.run_bytes += n
                return
        m = self.nmsg
        self.iov64[2 * j] = ring.base + SLOT * i
        self.iov64[2 * j + 1] = n
        w = MSG_WORDS * m
        m64 = self.m64
        if dst is None:
            m64[w] = 0
            m64[w + 1] = 0
        else:
            m64[w] = dst[1]
            m64[w + 1] = len(dst[0])
        m64[w + 2] = self.iov_ptr + 16 * j
        m64[w + 3] = 1
        if seg and seg < n:
            self.ctrl_u16[(CTRL * m + 16) // 2] = seg
            m64[w + 4] = self.ctrl_ptr + CTRL * m
            m64[w + 5] = SEG_CMSG_SPACE
            self.run_size = 0  # a coalesced run is a message of its own
        else:
            seg = 0
            m64[w + 4] = 0
            m64[w + 5] = 0
            self.run_size = n if n <= self.gso_max else 0
        self.keep.append([[(ring.views[i], n)], seg, dst])
        self.nmsg = m + 1
        self.niov = j + 1
        self.run_dst, self.run_bytes = dst, n

    def send(self, fd: int, on_error: Callable[[OSError], None],
             fallback: Callable[[memoryview, tuple | None], None]) -> None:
        """Send what was added (each message once; a failed one is reported and skipped)."""
        for k, err in send_messages(self.lib, fd, self.msgs_ptr, self.nmsg):
            slots, seg, dst = self.keep[k]
            if seg and err in GSO_REFUSED:  # the datagrams one by one
                self.gso_max = gso_limit(self.gso_max, seg, err)
                for v, n in slots:
                    for off in range(0, n, seg):
                        fallback(v[off:min(off + seg, n)], dst)
            else:
                on_error(OSError(err, os.strerror(err)))
        self.clear()

    def clear(self) -> None:
        self.keep.clear()
        self.nmsg = self.niov = 0
        self.run_dst, self.run_size = None, 0


def address(raw: bytes) -> tuple:
    """The address tuple recvfrom gives for the raw sockaddr `raw`."""
    fam = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if fam != socket.AF_INET6:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    flow, scope = int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder)
    if scope and host.lower().startswith(("fe8", "fe9", "fea", "feb", "ff02")):
        try:
            host += "%" + socket.if_indextoname(scope)
        except OSError:
            host += f"%{scope}"
    return (host, port, flow, scope)


def dest(addr: tuple, family: int) -> tuple[bytes, int]:
    """A destination for `Batch.add`: the raw sockaddr and its address in memory."""
    raw = sockaddr(addr, family)
    return raw, ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value


def segments(view: memoryview, n: int, seg: int) -> list[memoryview]:
    """The datagrams of a GRO slot of n bytes in segments of seg bytes (seg 0: one datagram)."""
    if not seg or seg >= n:
        return [view[:n]]
    return [view[off:min(off + seg, n)] for off in range(0, n, seg)]
