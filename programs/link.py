"""A linker from clang's BPF object files to an SBPF v0 program (the ELF a Solana cluster
loads), because neither lld 14 nor lld 19 links them (``../shared/ONCHAIN.md``).

What it does, and nothing more:

* merges every ``.text*`` section into one ``.text`` and every ``.rodata*`` /
  ``.data.rel.ro*`` into one ``.rodata``; refuses writable data (SBPF has no writable
  globals) and the 32-bit ALU instructions SBPF v0 executes differently from eBPF;
* resolves relocations statically: ``R_BPF_64_64`` (``lddw``) and ``R_BPF_64_ABS64`` /
  ``ABS32`` become absolute VM addresses (``0x1_0000_0000`` + file offset: every section
  sits at its file offset); a call to a defined function becomes a pc-relative call (the
  loader registers it); a call to an undefined symbol must be a syscall the runtime knows
  and stays a dynamic relocation against that name;
* writes ET_DYN / EM_BPF / ``e_flags`` 0 with sections ``.text .rodata .dynamic .dynsym
  .dynstr .rel.dyn .shstrtab`` in file order (``sh_addr == sh_offset``) and program
  headers PT_LOAD text, PT_LOAD rodata, PT_LOAD dynamic, PT_DYNAMIC.

    python programs/link.py OUT.so IN.o [IN.o …] [--entry entrypoint]
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

MM_PROGRAM_START = 0x1_0000_0000
INSN = 8
EM_BPF = 247
R_BPF_64_64, R_BPF_64_ABS64, R_BPF_64_ABS32, R_BPF_64_32 = 1, 2, 3, 10
CALL_IMM = 0x85
# 32-bit ALU ops SBPF v0 sign-extends where eBPF zero-extends (silently wrong code)
ALU32_REFUSED = {0x04: "add32", 0x0C: "add32", 0x14: "sub32", 0x1C: "sub32",
                 0x24: "mul32", 0x2C: "mul32"}
SYSCALLS = frozenset({
    "abort", "sol_panic_", "sol_log_", "sol_log_64_", "sol_log_pubkey",
    "sol_log_compute_units_", "sol_log_data", "sol_sha256", "sol_keccak256",
    "sol_memcpy_", "sol_memmove_", "sol_memset_", "sol_memcmp_",
    "sol_create_program_address", "sol_try_find_program_address",
    "sol_invoke_signed_c", "sol_invoke_signed_rust", "sol_get_clock_sysvar",
    "sol_get_rent_sysvar", "sol_get_epoch_schedule_sysvar", "sol_set_return_data",
    "sol_get_return_data", "sol_get_stack_height", "sol_remaining_compute_units",
    "sol_get_processed_sibling_instruction", "sol_secp256k1_recover",
    "sol_curve_validate_point", "sol_curve_group_op",
})


class LinkError(Exception):
    """The objects cannot make a valid SBPF v0 program (the message says why)."""


@dataclass
class _Input:
    """One input section placed in an output section at ``offset``."""

    name: str
    data: bytes
    out: str  # "text" | "rodata"
    offset: int = 0


@dataclass
class _Object:
    path: Path
    elf: ELFFile
    placed: dict[int, _Input] = field(default_factory=dict)  # section index → placement


def _kind(name: str, flags: int) -> str | None:
    if name == ".text" or name.startswith(".text."):
        return "text"
    if name.startswith((".rodata", ".data.rel.ro")):
        return "rodata"
    if name.startswith((".data", ".bss")) and flags & 0x2:  # SHF_ALLOC
        raise LinkError(f"section {name}: SBPF has no writable globals (make it const, or "
                        "keep it on the stack or heap)")
    return None


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def link(objects: list[Path], output: Path, entry: str = "entrypoint") -> None:
    """Link ``objects`` into the program ``output`` (raises :class:`LinkError`)."""
    inputs = [_Object(path, ELFFile(path.open("rb"))) for path in objects]
    text, rodata = bytearray(), bytearray()
    for obj in inputs:
        if obj.elf["e_machine"] != "EM_BPF":
            raise LinkError(f"{obj.path}: not a BPF object")
        for index, section in enumerate(obj.elf.iter_sections()):
            kind = _kind(section.name, section["sh_flags"])
            if kind is None or section["sh_type"] == "SHT_NOBITS":
                continue
            buffer = text if kind == "text" else rodata
            start = _align(len(buffer), max(8, section["sh_addralign"] or 1))
            buffer.extend(b"\0" * (start - len(buffer)))
            buffer.extend(section.data())
            obj.placed[index] = _Input(section.name, section.data(), kind, start)
    # layout: header, program headers, .text, .rodata, then the dynamic sections
    header_size, phdr_size, phnum = 64, 56, 4
    text_off = _align(header_size + phdr_size * phnum, 8)
    rodata_off = _align(text_off + len(text), 8)
    base = {"text": text_off, "rodata": rodata_off}
    symbols = _global_symbols(inputs, base)
    syscalls: list[tuple[int, str]] = []  # (file offset of the call, syscall name)
    for obj in inputs:
        _relocate(obj, text, rodata, base, symbols, syscalls)
    _check_instructions(text)
    if entry not in symbols:
        raise LinkError(f"no {entry!r} function to start the program at")
    image = _write(text, rodata, base, syscalls, symbols[entry])
    output.write_bytes(image)


def _global_symbols(inputs: list[_Object], base: dict[str, int]) -> dict[str, int]:
    """Defined function and object symbols → their file offset in the output."""
    found: dict[str, int] = {}
    for obj in inputs:
        table = obj.elf.get_section_by_name(".symtab")
        assert isinstance(table, SymbolTableSection)
        for symbol in table.iter_symbols():
            index = symbol["st_shndx"]
            if not isinstance(index, int) or index not in obj.placed or not symbol.name:
                continue
            if symbol["st_info"]["bind"] == "STB_LOCAL":
                continue
            placed = obj.placed[index]
            if symbol.name in found:
                raise LinkError(f"{symbol.name} is defined twice")
            found[symbol.name] = base[placed.out] + placed.offset + symbol["st_value"]
    return found


def _symbol_offset(obj: _Object, symbol: object, base: dict[str, int],
                   symbols: dict[str, int]) -> int | None:
    """The output file offset a relocation's symbol stands for (None: undefined)."""
    index = symbol["st_shndx"]  # type: ignore[index]
    if isinstance(index, int) and index in obj.placed:
        placed = obj.placed[index]
        return base[placed.out] + placed.offset + symbol["st_value"]  # type: ignore[index]
    name = symbol.name  # type: ignore[attr-defined]
    return symbols.get(name)


def _relocate(obj: _Object, text: bytearray, rodata: bytearray, base: dict[str, int],
              symbols: dict[str, int], syscalls: list[tuple[int, str]]) -> None:
    table = obj.elf.get_section_by_name(".symtab")
    for section in obj.elf.iter_sections():
        if not isinstance(section, RelocationSection):
            continue
        target = obj.placed.get(section["sh_info"])
        if target is None:
            continue  # relocations of debug sections: nothing loads them
        buffer = text if target.out == "text" else rodata
        for reloc in section.iter_relocations():
            kind = reloc["r_info_type"]
            at = target.offset + reloc["r_offset"]  # within buffer
            symbol = table.get_symbol(reloc["r_info_sym"])  # type: ignore[union-attr]
            where = _symbol_offset(obj, symbol, base, symbols)
            if kind == R_BPF_64_64:
                addend, = struct.unpack_from("<i", buffer, at + 4)  # signed
                value = MM_PROGRAM_START + _required(where, symbol) + addend
                struct.pack_into("<I", buffer, at + 4, value & 0xFFFFFFFF)
                struct.pack_into("<I", buffer, at + 12, value >> 32)
            elif kind == R_BPF_64_ABS64:
                addend, = struct.unpack_from("<Q", buffer, at)
                struct.pack_into("<Q", buffer, at, MM_PROGRAM_START + _required(where, symbol)
                                 + addend)
            elif kind == R_BPF_64_ABS32:  # a VM address does not fit 32 bits
                raise LinkError(f"a 32-bit absolute address at {target.name}+"
                                f"{reloc['r_offset']:#x}: program addresses are 64-bit")
            elif kind == R_BPF_64_32:
                if target.out != "text" or buffer[at] != CALL_IMM:
                    raise LinkError(f"R_BPF_64_32 at {target.name}+{reloc['r_offset']:#x} is "
                                    "not a call")
                if where is None:
                    name = symbol.name
                    if name not in SYSCALLS:
                        raise LinkError(f"undefined symbol {name!r} (not a syscall the "
                                        "runtime has)")
                    struct.pack_into("<i", buffer, at + 4, -1)
                    syscalls.append((base["text"] + at, name))
                    continue
                imm, = struct.unpack_from("<i", buffer, at + 4)
                # a section-symbol call carries the target's slot in imm
                destination = where + (imm + 1) * INSN if symbol["st_info"]["type"] == \
                    "STT_SECTION" else where
                pc = base["text"] + at
                relative = (destination - (pc + INSN)) // INSN
                buffer[at + 1] = (buffer[at + 1] & 0x0F) | 0x10  # src = 1: internal call
                struct.pack_into("<i", buffer, at + 4, relative)
            else:
                raise LinkError(f"relocation type {kind} is not supported")


def _required(where: int | None, symbol: object) -> int:
    if where is None:
        raise LinkError(f"undefined symbol {symbol.name!r}")  # type: ignore[attr-defined]
    return where


def _check_instructions(text: bytearray) -> None:
    for pc in range(0, len(text), INSN):
        opcode = text[pc]
        if opcode in ALU32_REFUSED:
            raise LinkError(f"{ALU32_REFUSED[opcode]} at instruction {pc // INSN}: SBPF v0 "
                            "sign-extends it (build with -mcpu=v2, no +alu32)")
        if opcode == 0x8D:  # callx: LLVM 19 puts the register in dst, v0 reads imm
            register = text[pc + 1] & 0x0F
            if register:
                struct.pack_into("<i", text, pc + 4, register)
                text[pc + 1] &= 0xF0


def _write(text: bytearray, rodata: bytearray, base: dict[str, int],
           syscalls: list[tuple[int, str]], entry: int) -> bytes:
    """The ELF image: sections at their file offsets, dynamic relocations for syscalls."""
    names = sorted({name for _, name in syscalls})
    dynstr = bytearray(b"\0")
    name_at: dict[str, int] = {}
    for name in names:
        name_at[name] = len(dynstr)
        dynstr.extend(name.encode() + b"\0")
    # .dynsym: the null symbol, then one GLOBAL NOTYPE undefined symbol per syscall
    dynsym = bytearray(24)
    for name in names:
        dynsym.extend(struct.pack("<IBBHQQ", name_at[name], 0x10, 0, 0, 0, 0))
    index = {name: i + 1 for i, name in enumerate(names)}
    reldyn = bytearray()
    for offset, name in sorted(syscalls):
        reldyn.extend(struct.pack("<QQ", offset, (index[name] << 32) | R_BPF_64_32))
    text_off, rodata_off = base["text"], base["rodata"]
    dynamic_off = _align(rodata_off + len(rodata), 8)
    dynamic_size = 7 * 16
    dynsym_off = dynamic_off + dynamic_size
    dynstr_off = dynsym_off + len(dynsym)
    reldyn_off = _align(dynstr_off + len(dynstr), 8)
    dynamic = bytearray()
    for tag, value in ((6, dynsym_off), (5, dynstr_off), (10, len(dynstr)), (11, 24),
                       (17, reldyn_off), (18, len(reldyn)), (19, 16)):
        dynamic.extend(struct.pack("<qQ", tag, value))  # SYMTAB STRTAB STRSZ SYMENT REL…
    assert len(dynamic) == dynamic_size
    shstrtab = bytearray(b"\0")
    section_names = [".text", ".rodata", ".dynamic", ".dynsym", ".dynstr", ".rel.dyn",
                     ".shstrtab"]
    name_offsets = {}
    for name in section_names:
        name_offsets[name] = len(shstrtab)
        shstrtab.extend(name.encode() + b"\0")
    shstrtab_off = reldyn_off + len(reldyn)
    shoff = _align(shstrtab_off + len(shstrtab), 8)
    image = bytearray(shoff)
    image[text_off:text_off + len(text)] = text
    image[rodata_off:rodata_off + len(rodata)] = rodata
    image[dynamic_off:dynamic_off + dynamic_size] = dynamic
    image[dynsym_off:dynsym_off + len(dynsym)] = dynsym
    image[dynstr_off:dynstr_off + len(dynstr)] = dynstr
    image[reldyn_off:reldyn_off + len(reldyn)] = reldyn
    image[shstrtab_off:shstrtab_off + len(shstrtab)] = shstrtab
    # section headers: null, then the seven, all at sh_addr == sh_offset
    sections = [
        (".text", 1, 0x6, text_off, len(text), 0, 0, 8, 0),  # PROGBITS, ALLOC|EXECINSTR
        (".rodata", 1, 0x2, rodata_off, len(rodata), 0, 0, 8, 0),
        (".dynamic", 6, 0x3, dynamic_off, dynamic_size, 5, 0, 8, 16),  # link: .dynstr
        (".dynsym", 11, 0x2, dynsym_off, len(dynsym), 5, 1, 8, 24),
        (".dynstr", 3, 0x2, dynstr_off, len(dynstr), 0, 0, 1, 0),
        (".rel.dyn", 9, 0x2, reldyn_off, len(reldyn), 4, 0, 8, 16),  # link: .dynsym
        (".shstrtab", 3, 0, shstrtab_off, len(shstrtab), 0, 0, 1, 0),
    ]
    headers = bytearray(64)
    for name, kind, flags, offset, size, link_to, info, align, entsize in sections:
        address = offset if flags & 0x2 else 0
        headers.extend(struct.pack("<IIQQQQIIQQ", name_offsets[name], kind, flags, address,
                                   offset, size, link_to, info, align, entsize))
    phdrs = bytearray()
    for kind, flags, offset, size in (
            (1, 0x5, text_off, len(text)),  # PT_LOAD R+X
            (1, 0x4, rodata_off, len(rodata)),  # PT_LOAD R
            (1, 0x6, dynamic_off, reldyn_off + len(reldyn) - dynamic_off),  # PT_LOAD RW
            (2, 0x6, dynamic_off, dynamic_size)):  # PT_DYNAMIC
        phdrs.extend(struct.pack("<IIQQQQQQ", kind, flags, offset, offset, offset, size, size,
                                 8))
    image[64:64 + len(phdrs)] = phdrs
    elf_header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7, 3, EM_BPF, 1,
        entry, 64, shoff, 0, 64, 56, 4, 64, len(sections) + 1, len(sections))
    image[0:64] = elf_header
    return bytes(image + headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Link BPF objects into an SBPF v0 program.")
    parser.add_argument("output", type=Path)
    parser.add_argument("objects", type=Path, nargs="+")
    parser.add_argument("--entry", default="entrypoint")
    args = parser.parse_args(argv)
    try:
        link(args.objects, args.output, args.entry)
    except LinkError as exc:
        print(f"link: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
