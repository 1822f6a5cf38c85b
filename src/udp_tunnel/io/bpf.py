"""The bpf(2) system call from the standard library (ctypes), and a loader for
the one kind of ELF object bpf/relay.bpf.c compiles to.

Only what the kernel data path (io/kernel.py) and its tests need: maps
(create, update, lookup, lookup-and-delete, batch lookup), program load (with the
verifier's log when it refuses), tcx links (BPF_LINK_CREATE with
BPF_TCX_INGRESS: the link is a file descriptor, so the program is detached
when the last descriptor closes, even when the process is killed),
BPF_PROG_QUERY of a tcx attach point, program info by id, and
BPF_PROG_TEST_RUN. The attribute layouts are the kernel's `union bpf_attr`
(include/uapi/linux/bpf.h); each command's struct is packed by offset into a
zeroed buffer, which the kernel accepts at any length as long as what it does
not know is zero.

The object format (see bpf/relay.h): one program section, maps as
`struct map_def {type, key_size, value_size, max_entries, flags}` in a
section "maps", named by the symbol table, referenced from the program by
ld_imm64 instructions with R_BPF_64_64 relocations against those symbols, and
a "license" section. No BTF, no global data, no bpf-to-bpf calls: the loader
refuses an object that needs more, saying what.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import NamedTuple

SYS_BPF = {"x86_64": 321, "amd64": 321, "aarch64": 280, "arm64": 280}

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, PROG_LOAD = 0, 1, 2, 5
PROG_TEST_RUN, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 10, 13, 15, 16
MAP_LOOKUP_AND_DELETE_ELEM, MAP_LOOKUP_BATCH, LINK_CREATE = 21, 24, 28

# map types, program types, attach types
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY = 1, 2, 6
PROG_SCHED_CLS = 3
TCX_INGRESS = 46

# BPF_PROG_TEST_RUN flags
TEST_SKB_CHECKSUM_COMPLETE = 1 << 2

ATTR_SIZE = 128
LOG_SIZE = 1 << 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed; `log` holds the verifier's output for a refused program."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.what = what
        self.log = log

    def __str__(self) -> str:
        return f"{self.what}: {self.strerror}"


def _nr() -> int:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise BpfError(38, f"bpf() on {platform.machine()} (its system call number is not known here)")
    return nr


def call(cmd: int, attr: ctypes.Array, what: str) -> int:
    r = _libc.syscall(ctypes.c_long(_nr()), ctypes.c_long(cmd), ctypes.c_void_p(ctypes.addressof(attr)),
                      ctypes.c_long(ctypes.sizeof(attr)))
    if r < 0:
        raise BpfError(ctypes.get_errno(), what)
    return r


def _attr() -> ctypes.Array:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _ptr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _name(name: str) -> bytes:
    return name.encode()[:15]


# --- maps ---

def map_create(kind: int, key_size: int, value_size: int, max_entries: int, name: str = "", flags: int = 0) -> int:
    a = _attr()
    struct.pack_into("=IIIII", a, 0, kind, key_size, value_size, max_entries, flags)
    struct.pack_into("16s", a, 28, _name(name))
    return call(MAP_CREATE, a, f"creating map {name}")


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    a = _attr()
    struct.pack_into("=IxxxxQQQ", a, 0, fd, _ptr(k), _ptr(v), flags)
    call(MAP_UPDATE_ELEM, a, "updating a map entry")


def _value_of(cmd: int, fd: int, key: bytes, value_size: int, what: str) -> bytes | None:
    """A command that reads one entry's value (lookup, lookup-and-delete); None if it is not there."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    a = _attr()
    struct.pack_into("=IxxxxQQ", a, 0, fd, _ptr(k), _ptr(v))
    try:
        call(cmd, a, what)
    except BpfError as e:
        if e.errno == 2:  # ENOENT
            return None
        raise
    return v.raw


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    return _value_of(MAP_LOOKUP_ELEM, fd, key, value_size, "looking up a map entry")


def map_pop(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Look an entry up and delete it in one step (a hash map: Linux 5.14); None if it is not there."""
    return _value_of(MAP_LOOKUP_AND_DELETE_ELEM, fd, key, value_size, "taking a map entry")


def map_items(fd: int, key_size: int, value_size: int, batch: int = 1024) -> list[tuple[bytes, bytes]]:
    """Every entry of a hash map, `batch` at a time (BPF_MAP_LOOKUP_BATCH)."""
    out: list[tuple[bytes, bytes]] = []
    token_in, token_out = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
    first = True
    while True:
        keys = ctypes.create_string_buffer(key_size * batch)
        values = ctypes.create_string_buffer(value_size * batch)
        a = _attr()
        struct.pack_into("=QQQQIIQQ", a, 0, 0 if first else _ptr(token_in), _ptr(token_out), _ptr(keys),
                         _ptr(values), batch, fd, 0, 0)
        done = False
        try:
            call(MAP_LOOKUP_BATCH, a, "reading a map")
        except BpfError as e:
            if e.errno == 28:  # ENOSPC: one hash bucket holds more than a batch
                batch *= 2
                continue
            if e.errno != 2:  # ENOENT: this was the last batch
                raise
            done = True
        count = struct.unpack_from("=I", a, 32)[0]
        kr, vr = keys.raw, values.raw
        for i in range(count):
            out.append((kr[i * key_size:(i + 1) * key_size], vr[i * value_size:(i + 1) * value_size]))
        if done:
            return out
        token_in.raw = token_out.raw
        first = False


# --- programs ---

def _prog_load(kind: int, insns: bytes, license: str, name: str, log: ctypes.Array | None) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    a = _attr()
    struct.pack_into("=IIQQIIQ", a, 0, kind, len(insns) // 8, _ptr(code), _ptr(lic), 1 if log else 0,
                     len(log) if log else 0, _ptr(log))
    struct.pack_into("16s", a, 48, _name(name))
    return call(PROG_LOAD, a, f"loading program {name}")


def prog_load(kind: int, insns: bytes, license: str, name: str = "") -> int:
    """Load a program; a refusal raises BpfError whose .log is the verifier's output."""
    try:
        return _prog_load(kind, insns, license, name, None)
    except BpfError as e:
        if e.errno not in (13, 22):  # EACCES, EINVAL: the verifier said no (ask again for its reasons)
            raise
    log = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return _prog_load(kind, insns, license, name, log)
    except BpfError as e:
        e.log = log.value.decode(errors="replace")
        raise


def link_create(prog_fd: int, ifindex: int, attach_type: int = TCX_INGRESS) -> int:
    a = _attr()
    struct.pack_into("=IIII", a, 0, prog_fd, ifindex, attach_type, 0)
    return call(LINK_CREATE, a, "attaching (tcx link)")


def prog_ids(ifindex: int, attach_type: int = TCX_INGRESS, room: int = 64) -> list[int]:
    """The ids of the programs attached at an interface's tcx hook, in the order they run."""
    progs = (ctypes.c_uint32 * room)()
    a = _attr()
    struct.pack_into("=IIIIQI", a, 0, ifindex, attach_type, 0, 0, ctypes.addressof(progs), room)
    call(PROG_QUERY, a, "querying tcx")
    n = struct.unpack_from("=I", a, 24)[0]
    return list(progs[:min(n, room)])


def _prog_info(fd: int) -> bytes:
    """struct bpf_prog_info of a loaded program (its first 256 bytes)."""
    info = ctypes.create_string_buffer(256)
    a = _attr()
    struct.pack_into("=IIQ", a, 0, fd, len(info), ctypes.addressof(info))
    call(OBJ_GET_INFO_BY_FD, a, "reading program info")
    return info.raw


def prog_id(fd: int) -> int:
    """The id of a loaded program."""
    return struct.unpack_from("=I", _prog_info(fd), 4)[0]


def prog_name_by_id(prog_id: int) -> str | None:
    """The name a loaded program was given, or None if it is gone."""
    a = _attr()
    struct.pack_into("=I", a, 0, prog_id)
    try:
        fd = call(PROG_GET_FD_BY_ID, a, "opening a program by id")
    except BpfError as e:
        if e.errno == 2:
            return None
        raise
    try:
        return _prog_info(fd)[64:80].split(b"\0", 1)[0].decode()
    finally:
        os.close(fd)


class TestRun(NamedTuple):
    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, ctx: bytes = b"", flags: int = 0, repeat: int = 1) -> TestRun:
    """BPF_PROG_TEST_RUN: the program's return value (as a signed int) and the packet it left."""
    din = ctypes.create_string_buffer(data, len(data))
    dout = ctypes.create_string_buffer(len(data) + 512)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    a = _attr()
    struct.pack_into("=IIIIQQII", a, 0, prog_fd, 0, len(data), len(dout), _ptr(din), _ptr(dout), repeat, 0)
    if ctx:
        struct.pack_into("=IIQ", a, 40, len(ctx), 0, _ptr(cin))
    struct.pack_into("=I", a, 64, flags)
    call(PROG_TEST_RUN, a, "test run")
    retval, _, size_out = struct.unpack_from("=iII", a, 4)
    duration = struct.unpack_from("=I", a, 36)[0]
    return TestRun(retval, dout.raw[:size_out], duration)


# --- the object file ---

class MapDef(NamedTuple):
    kind: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class BpfObject(NamedTuple):
    insns: bytes  # the program, relocations not yet applied
    license: str
    maps: dict[str, MapDef]
    relocs: list[tuple[int, str]]  # (instruction index, map name): ld_imm64 to patch with the map's fd


R_BPF_64_64 = 1
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1


class _Elf:
    """The sections and symbols of an ELF64 little-endian object, as parse_object reads them."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            raise ValueError("not a little-endian 64-bit ELF object")
        if struct.unpack_from("<H", data, 18)[0] != 247:  # EM_BPF
            raise ValueError("not a BPF object")
        self.data = data
        shoff = struct.unpack_from("<Q", data, 40)[0]
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)
        # each section: [name offset, type, file offset, size, link, info, entsize]
        self.sections = []
        for i in range(shnum):
            name, kind, _, _, off, size, link, info, _, entsize = struct.unpack_from("<IIQQQQIIQQ", data,
                                                                                       shoff + i * shentsize)
            self.sections.append([name, kind, off, size, link, info, entsize])
        self.names = [self.string(s[0], self.sections[shstrndx]) for s in self.sections]
        self.by_name = {n: i for i, n in enumerate(self.names)}

    def string(self, off: int, tab) -> str:
        start = tab[2] + off
        return self.data[start:self.data.index(b"\0", start)].decode()

    def body(self, i: int) -> bytes:
        s = self.sections[i]
        return self.data[s[2]:s[2] + s[3]]

    def symbols(self) -> list[tuple[str, int, int, int]]:
        """(name, section index, value, size) of every symbol."""
        symtab_i = next((i for i, s in enumerate(self.sections) if s[1] == 2), None)  # SHT_SYMTAB
        if symtab_i is None:
            raise ValueError("no symbol table")
        symtab = self.sections[symtab_i]
        symstr = self.sections[symtab[4]]
        out = []
        for j in range(symtab[3] // 24):
            st_name, _, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", self.data, symtab[2] + j * 24)
            out.append((self.string(st_name, symstr), st_shndx, st_value, st_size))
        return out


def parse_object(data: bytes, section: str = "tc") -> BpfObject:
    """Read a little-endian ELF64 BPF object (one program section); ValueError says what is wrong."""
    elf = _Elf(data)
    if section not in elf.by_name:
        raise ValueError(f"no program section '{section}'")
    prog_i = elf.by_name[section]
    insns = elf.body(prog_i)
    lic = elf.body(elf.by_name["license"]).split(b"\0", 1)[0] if "license" in elf.by_name else b""
    symbols = elf.symbols()
    maps_i = elf.by_name.get("maps")
    maps, at = _maps(elf, maps_i, symbols)
    relocs = _relocations(elf, prog_i, maps_i, symbols, at, insns)
    return BpfObject(insns, lic.decode(), maps, relocs)


def _maps(elf: _Elf, maps_i: int | None, symbols) -> tuple[dict[str, MapDef], dict[int, str]]:
    """The map definitions by name, and the map names by their offset in the maps section."""
    maps: dict[str, MapDef] = {}
    at: dict[int, str] = {}
    if maps_i is None:
        return maps, at
    ms = elf.sections[maps_i]
    for name, shndx, value, size in symbols:
        if shndx == maps_i and name:
            if size < 20:
                raise ValueError(f"map {name}: definition of {size} bytes")
            maps[name] = MapDef(*struct.unpack_from("<IIIII", elf.data, ms[2] + value))
            at[value] = name
    return maps, at


def _relocations(elf: _Elf, prog_i: int, maps_i: int | None, symbols, at: dict[int, str],
                 insns: bytes) -> list[tuple[int, str]]:
    """(instruction index, map name) of every map reference of the program section."""
    relocs: list[tuple[int, str]] = []
    for s in elf.sections:
        if s[1] == 9 and s[5] == prog_i:  # SHT_REL for the program section
            for j in range(s[3] // 16):
                r_offset, r_info = struct.unpack_from("<QQ", elf.data, s[2] + j * 16)
                sym, kind = r_info >> 32, r_info & 0xFFFFFFFF
                name, shndx, value, _ = symbols[sym]
                if kind != R_BPF_64_64 or shndx != maps_i:
                    raise ValueError(f"relocation of type {kind} against '{name or elf.names[shndx]}' "
                                     "(only map references are supported)")
                if insns[r_offset] != LD_IMM64:
                    raise ValueError(f"map relocation at instruction {r_offset // 8} is not ld_imm64")
                relocs.append((r_offset // 8, at[value]))
        elif s[1] == 4 and s[5] == prog_i:  # SHT_RELA
            raise ValueError("RELA relocations are not supported")
    return relocs


def patch(obj: BpfObject, fds: dict[str, int]) -> bytes:
    """The program with every map reference pointing at its map's file descriptor."""
    code = bytearray(obj.insns)
    for i, name in obj.relocs:
        o = i * 8
        code[o + 1] = (code[o + 1] & 0x0F) | (PSEUDO_MAP_FD << 4)  # src_reg: a map fd; dst_reg kept
        struct.pack_into("<i", code, o + 4, fds[name])
        struct.pack_into("<i", code, o + 12, 0)
    return bytes(code)


def possible_cpus() -> int:
    """How many values a per-CPU map holds per key (the possible CPUs, not the online ones)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n
