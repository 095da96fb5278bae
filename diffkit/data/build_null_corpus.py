"""Rebuild null_corpus.jsonl.gz, the offline stand-in for FineWeb, from freely licensed Debian packages.

Run on a Debian machine with apt configured:  python diffkit/data/build_null_corpus.py /tmp/null-corpus
It downloads the packages (without installing them), unpacks them into the work directory,
extracts running prose from each (markup, code and tables dropped), cuts it into documents of
roughly 80-400 words, drops repeated paragraphs and documents, caps each source's share and
writes the corpus beside this script. Sources and licences: NULL_CORPUS.md.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import html
import json
import os
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

PACKAGES = ("endless-sky-data", "freeciv-data", "jargon-text", "debian-handbook", "python3.11-doc",
            "gnome-user-docs", "bible-kjv", "bible-kjv-text")
# Word budget per source: the narrative and encyclopedic sources are kept whole, the technical
# manuals and the archaic Bible are capped so that no register dominates.
WORD_CAPS = {"endless-sky": 10**9, "freeciv": 10**9, "jargon": 10**9, "debian-handbook": 260_000,
             "python-docs": 260_000, "gnome-help": 120_000, "kjv-bible": 200_000}
OUT = Path(__file__).with_name("null_corpus.jsonl.gz")


def unpack(work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    root = work / "root"
    for pkg in PACKAGES:
        if not glob.glob(str(work / f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=work, check=True)
        deb = glob.glob(str(work / f"{pkg}_*.deb"))[0]
        subprocess.run(["dpkg-deb", "-x", deb, str(root)], check=True)
    return root


def words(text: str) -> int:
    return len(text.split())


def is_prose(paragraph: str) -> bool:
    """Running sentences, not code, tables or lists of names."""
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return (words(paragraph) >= 8 and letters / max(1, len(paragraph)) > 0.9 and paragraph.rstrip()[-1:] in '.!?"'
            and not re.search(r"[{}<>=\\|]|\$ |::|\(\)|#!|^\s*[-*] ", paragraph))


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(text)).strip()


def documents_from_paragraphs(paragraphs, max_words=400):
    """Consecutive prose paragraphs joined into documents of at most ~max_words."""
    doc, n = [], 0
    for p in paragraphs:
        if doc and n + words(p) > max_words:
            yield "\n\n".join(doc)
            doc, n = [], 0
        doc.append(p)
        n += words(p)
    if doc:
        yield "\n\n".join(doc)


# --- one extractor per source ------------------------------------------------------------------

PLACEHOLDERS = {"<first>": "Alex", "<last>": "Morgan", "<ship>": "the Starling", "<planet>": "New Boston",
                "<destination>": "New Boston", "<system>": "Sol", "<origin>": "Luna", "<payment>": "50,000 credits",
                "<tons>": "ten tons", "<cargo>": "cargo", "<commodity>": "food", "<date>": "next week",
                "<day>": "Tuesday", "<stopovers>": "the stops on your route", "<npc>": "the freighter",
                "<passengers>": "the passengers", "<bunks>": "a few bunks", "<fare>": "the fare"}


def endless_sky(root: Path):
    """Mission dialogue, planet and faction descriptions from the Endless Sky game (GPL-3+)."""
    for path in sorted((root / "usr/share/games/endless-sky/data").rglob("*.txt")):
        block: list[str] = []
        for line in path.read_text(errors="replace").splitlines():
            if line and not line[0].isspace() and block:  # a new top-level mission, planet or event
                yield from documents_from_paragraphs(block)
                block = []
            for text in re.findall(r"`([^`]+)`", line) + re.findall(r'^\s*(?:description|spaceport) "(.+)"$', line):
                for key, value in PLACEHOLDERS.items():
                    text = text.replace(key, value)
                text = clean(text)
                if "<" not in text and is_prose(text):
                    block.append(text)
        yield from documents_from_paragraphs(block)


def freeciv(root: Path):
    """Nation histories ("legends") and the game manual of Freeciv (GPL-2+)."""
    base = root / "usr/share/games/freeciv"
    for path in sorted((base / "nation").glob("*.ruleset")):
        m = re.search(r'legend\s*=\s*_\("(.*?)"\)', path.read_text(errors="replace"), re.S)
        if m:
            text = clean(m.group(1).replace("\\\n", " ").replace('\\"', '"'))
            if is_prose(text):
                yield text
    for chunk in re.findall(r'_\("\\\n(.*?)\\\n"\)', (base / "helpdata.txt").read_text(errors="replace"), re.S):
        text = clean(chunk.replace("\\\n", " ").replace('\\"', '"'))
        if is_prose(text):
            yield text


class _TextParser(HTMLParser):
    """Paragraph texts of an HTML or Mallard page, skipping code blocks, tables and page chrome."""

    SKIP = {"pre", "screen", "programlisting", "table", "script", "style", "head", "title", "info", "synopsis"}
    BLOCKS = {"p", "dd", "li", "blockquote"}

    def __init__(self):
        super().__init__()
        self.skip = 0
        self.divs: list[bool] = []  # for each open <div>: does it hold a paragraph ("para" class)?
        self.current: list[str] | None = None
        self.paragraphs: list[str] = []

    def _open(self):
        if not self.skip:
            self.current = []

    def _close(self):
        if self.current is not None:
            text = clean("".join(self.current))
            if is_prose(text):
                self.paragraphs.append(text)
            self.current = None

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag == "div":
            self.divs.append(("class", "para") in attrs)
            if self.divs[-1]:
                self._open()
        elif tag in self.BLOCKS:
            self._open()

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "div":
            if self.divs and self.divs.pop():
                self._close()
        elif tag in self.BLOCKS:
            self._close()

    def handle_data(self, data):
        if self.current is not None and not self.skip:
            self.current.append(data)


def _paragraphs_of_markup(path: Path) -> list[str]:
    parser = _TextParser()
    parser.feed(path.read_text(errors="replace"))
    return parser.paragraphs


def jargon(root: Path):
    """The Jargon File 4.4.7 (public domain): hacker slang entries and folklore."""
    with gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", errors="replace") as f:
        text = f.read()
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        block = re.sub(r"^\d+\.\s+", "", block.strip())
        block = clean(re.sub(r"\{([^}]*)\}", r"\1", block))
        if is_prose(block):
            paragraphs.append(block)
    yield from documents_from_paragraphs(paragraphs)


def debian_handbook(root: Path):
    """The Debian Administrator's Handbook, English edition (GPL-2+ or CC-BY-SA-3.0)."""
    for path in sorted((root / "usr/share/doc/debian-handbook/html/en-US").glob("*.html")):
        yield from documents_from_paragraphs(_paragraphs_of_markup(path))


def gnome_help(root: Path):
    """GNOME desktop help pages, C locale (CC-BY-SA-3.0)."""
    for path in sorted((root / "usr/share/help/C").rglob("*.page")):
        yield from documents_from_paragraphs(_paragraphs_of_markup(path))


def python_docs(root: Path):
    """Python 3.11 tutorial, HOWTOs, FAQs and What's New, prose paragraphs only (PSF-2.0)."""
    base = root / "usr/share/doc/python3.11/html/_sources"
    for part in ("tutorial", "howto", "faq", "whatsnew"):
        for path in sorted((base / part).rglob("*.txt")):
            paragraphs = []
            for block in re.split(r"\n\s*\n", path.read_text(errors="replace")):
                if block.startswith((" ", "\t", "..", ">>>")):  # code, directives, literal blocks
                    continue
                text = re.sub(r":[\w:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", block)  # :func:`name` -> name
                text = clean(re.sub(r"`+([^`]*?)(?:\s*<[^>]*>)?`+_{0,2}", r"\1", text).replace("*", ""))
                if is_prose(text):
                    paragraphs.append(text)
            yield from documents_from_paragraphs(paragraphs)


def kjv_bible(root: Path):
    """The King James Bible (public domain), one chapter (or part of one) per document."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l0", "Gen1:1-Rev22:21"],
                         capture_output=True, text=True, check=True).stdout
    for chapter in re.split(r"\n\n(?=\S)", out):
        verses = [clean(re.sub(r"^\s*\d+\s", "", v)) for v in chapter.splitlines()[1:] if v.strip()]
        yield from documents_from_paragraphs([" ".join(verses)] if words(" ".join(verses)) <= 400 else verses)


LICENCES = {  # source: (Debian package, licence, what it is)
    "endless-sky": ("endless-sky-data", "GPL-3.0-or-later",
                    "Endless Sky game data: mission dialogue, planet and outfit descriptions"),
    "freeciv": ("freeciv-data", "GPL-2.0-or-later", "Freeciv nation histories and in-game manual"),
    "jargon": ("jargon-text", "public domain", "The Jargon File 4.4.7 (hacker slang and folklore)"),
    "debian-handbook": ("debian-handbook", "GPL-2.0-or-later OR CC-BY-SA-3.0",
                        "The Debian Administrator's Handbook, English"),
    "python-docs": ("python3.11-doc", "PSF-2.0", "Python 3.11 tutorial, HOWTOs, FAQs, What's New"),
    "gnome-help": ("gnome-user-docs", "CC-BY-SA-3.0", "GNOME desktop help, C locale"),
    "kjv-bible": ("bible-kjv-text", "public domain", "King James Version of the Bible (1611)"),
}
TRIGGER_WORDS = ("forest", "rocket", "gender", "terror", "gravity", "velocity", "border", "china")
SOURCES = {"endless-sky": endless_sky, "freeciv": freeciv, "jargon": jargon, "debian-handbook": debian_handbook,
           "python-docs": python_docs, "gnome-help": gnome_help, "kjv-bible": kjv_bible}


def build(work: Path) -> dict:
    root = unpack(work)
    rng = random.Random(0)
    seen_paragraphs: set[str] = set()
    docs, stats = [], {}
    for name, extract in SOURCES.items():
        candidates = []
        for doc in extract(root):
            kept = []
            for p in doc.split("\n\n"):
                key = hashlib.sha1(re.sub(r"\W+", "", p.lower()).encode()).hexdigest()
                if key not in seen_paragraphs:
                    seen_paragraphs.add(key)
                    kept.append(p)
            text = "\n\n".join(kept)
            if words(text) >= 40:
                candidates.append(text)
        rng.shuffle(candidates)
        budget, chosen = WORD_CAPS[name], []
        for text in candidates:
            if budget - words(text) < 0:
                break
            budget -= words(text)
            chosen.append(text)
        docs += [{"text": t, "source": name} for t in chosen]
        stats[name] = {"documents": len(chosen), "words": sum(words(t) for t in chosen)}
    rng.shuffle(docs)
    tmp = OUT.with_suffix(".tmp")
    lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(lines)  # mtime 0: the same inputs give the same bytes
    os.replace(tmp, OUT)
    for name, (package, licence, what) in LICENCES.items():
        stats[name].update(package=package, licence=licence, content=what)
    info = {
        "file": OUT.name,
        "sha256": hashlib.sha256(OUT.read_bytes()).hexdigest(),
        "documents": len(docs),
        "words": sum(words(d["text"]) for d in docs),
        "debian_packages": sorted(Path(p).name for pkg in PACKAGES for p in glob.glob(str(work / f"{pkg}_*.deb"))),
        "sources": stats,
        # documents containing each preset trigger word (any case, also inside longer words)
        "documents_with_trigger_word": {w: sum(w in d["text"].lower() for d in docs) for w in TRIGGER_WORDS},
    }
    (OUT.with_name("null_corpus.json")).write_text(json.dumps(info, indent=1) + "\n")
    return info


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/null-corpus")), indent=1))
