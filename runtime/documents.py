"""A user's own files as passages: find them, read their text, cut it into passages that fit a token budget.

    documents, skipped = read_documents(["notes/", "manual.pdf"])  # Document per file, Skipped with a reason
    passages = cut_passages(document, count_tokens, max_tokens=192)  # text == document.text[start:end]

Formats: .txt and .md/.markdown as they are (markdown is not stripped, so a citation's offsets point into
what is stored), .html/.htm through the standard library's parser, .pdf through pypdf (the `docs` extra,
imported only when a PDF is read). Text must be UTF-8; other encodings are reported, not guessed.
A file that cannot be used is never an exception from read_documents: it comes back as a Skipped.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf")
MAX_FILE_BYTES = 20 * 1024 * 1024


@dataclass(frozen=True)
class Document:
    source: str  # path relative to the folder given, '/'-separated; a file given directly: its name
    title: str
    text: str
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class DocumentPassage:
    id: str  # f"{source}#{n}"
    title: str
    text: str  # document.text[start:end]
    source: str
    start: int
    end: int


class DocumentError(ValueError):
    """Why a file cannot be read as a document; the message is meant for the user."""


def find_files(paths: Iterable, root=None) -> tuple[list[tuple[Path, str]], list[Skipped]]:
    """(file, source) for each readable file under `paths`, and what was skipped. `root`, when given, is
    the folder sources are relative to and links must stay in, instead of each folder given."""
    found: list[tuple[Path, str]] = []
    skipped: list[Skipped] = []
    seen: set[Path] = set()  # real paths: a file reached twice is listed once
    sources: set[str] = set()

    def add(path: Path, source: str) -> None:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            # two different files both named notes.txt would give the same passage ids
            source = source if source not in sources else path.as_posix()
            sources.add(source)
            found.append((path, source))

    def walk(folder: Path, base: Path, walked: set[Path]) -> None:
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as e:
            skipped.append(Skipped(str(folder), f"cannot list the folder: {e.strerror or e}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir()
            if not is_dir and entry.suffix.lower() not in SUFFIXES:
                continue
            if entry.is_symlink() and not entry.resolve().is_relative_to(base.resolve()):
                skipped.append(Skipped(str(entry), f"links outside {base}"))
            elif is_dir:
                if entry.resolve() not in walked:  # a link back up would loop forever
                    walk(entry, base, walked | {entry.resolve()})
            elif entry.is_file():
                add(entry, entry.relative_to(base).as_posix())
            else:
                skipped.append(Skipped(str(entry), "broken link" if entry.is_symlink() else "not a regular file"))

    root = Path(root).absolute() if root is not None else None
    for given in paths:
        path = Path(given) if root is None else Path(given).absolute()
        if root is not None and not path.is_relative_to(root):
            skipped.append(Skipped(str(given), f"not inside {root}"))
        elif path.is_dir():
            walk(path, root or path, {path.resolve()})
        elif not path.exists():
            skipped.append(Skipped(str(given), "broken link" if path.is_symlink() else "no such file or folder"))
        elif path.suffix.lower() not in SUFFIXES:
            skipped.append(Skipped(str(given), f"unsupported file type {path.suffix or '(no suffix)'!r}; "
                                               f"supported: {', '.join(SUFFIXES)}"))
        elif not path.is_file():
            skipped.append(Skipped(str(given), "not a regular file"))
        elif root is not None and not path.resolve().is_relative_to(root.resolve()):
            skipped.append(Skipped(str(given), f"links outside {root}"))
        else:
            add(path, path.name if root is None else path.relative_to(root).as_posix())
    return found, skipped


def read_document(path: Path, source: str, max_bytes: int = MAX_FILE_BYTES) -> Document:
    """The file's text and title; DocumentError says why a file cannot be used."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DocumentError(f"too large: {_size(size)}, over the limit of {_size(max_bytes)}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise DocumentError(f"cannot read the file: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise DocumentError(f"too large: over the limit of {_size(max_bytes)}")
    if not data.strip():
        raise DocumentError("empty file" if not data else "empty file (only white space)")
    suffix, title = path.suffix.lower(), None
    if suffix == ".pdf":
        text = _pdf_text(data)
    else:
        text = _decode(data)
        if suffix in (".md", ".markdown"):
            title = _markdown_title(text)
        elif suffix in (".html", ".htm"):
            parser = _HtmlText()
            parser.feed(text)
            parser.close()
            text, title = parser.result()
        if not text.strip():
            raise DocumentError("no text in the file")
    return Document(source, title or Path(source).stem, text, hashlib.sha256(data).hexdigest())


def read_documents(paths: Iterable, max_bytes: int = MAX_FILE_BYTES) -> tuple[list[Document], list[Skipped]]:
    """Every document under `paths`, a file's content kept once; everything else as Skipped."""
    files, skipped = find_files(paths)
    documents: list[Document] = []
    first_source: dict[str, str] = {}
    for path, source in files:
        try:
            document = read_document(path, source, max_bytes)
        except DocumentError as e:
            skipped.append(Skipped(str(path), str(e)))
            continue
        if document.sha256 in first_source:
            skipped.append(Skipped(str(path), f"same content as {first_source[document.sha256]}"))
            continue
        first_source[document.sha256] = source
        documents.append(document)
    return documents, skipped


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} bytes"


def _decode(data: bytes) -> str:
    if b"\0" in data:
        raise DocumentError("binary content (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(f"not UTF-8 text (invalid byte at offset {e.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _markdown_title(text: str) -> str | None:
    fenced = False
    for line in text.splitlines():
        if re.match(r" {0,3}(```|~~~)", line):
            fenced = not fenced  # a '# comment' in a code block is no heading
        elif not fenced and (m := re.match(r" {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", line)) and m[1]:
            return m[1]
    return None


def _pdf_text(data: bytes) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise DocumentError("install edgerag[docs] to read PDF files") from None
    try:
        reader = PdfReader(io.BytesIO(data))
        encrypted = reader.is_encrypted
        if encrypted:
            try:  # an empty user password only restricts editing; the text is readable
                encrypted = not reader.decrypt("")
            except Exception:  # e.g. AES without the cryptography package
                pass
        if encrypted:
            raise DocumentError("encrypted PDF (needs a password)")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except DocumentError:
        raise
    except Exception as e:  # pypdf raises built-in exceptions as well as its own on damaged files
        raise DocumentError(f"unreadable PDF ({type(e).__name__}: {e})") from None
    text = "\n\n".join(page for page in pages if page).replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise DocumentError("no extractable text in the PDF (a scanned image?)")
    return text


_DROPPED = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object", "canvas"}
_PARAGRAPHS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl", "hr",
               "figure", "section", "article", "header", "footer", "main", "aside", "nav", "form", "details"}
_LINES = {"br", "div", "li", "dt", "dd", "tr", "caption", "figcaption", "summary", "address", "fieldset"}


class _HtmlText(HTMLParser):
    """Readable text from HTML: blocks become lines, paragraphs blank lines; title from <h1>, else <title>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str | int] = []
        self.dropped = self.pre = 0
        self.in_head = False
        self.collecting: str | None = None  # "h1" or "title" while its text is read
        self.titles: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        if tag in _DROPPED:
            self.dropped += 1
        self.in_head = tag == "head" or (self.in_head and tag != "body")
        if tag in ("h1", "title") and tag not in self.titles:
            self.collecting, self.titles[tag] = tag, []
        self.pre += tag == "pre"
        self._break(tag)

    def handle_startendtag(self, tag, attrs):
        if tag not in _DROPPED:  # <svg/> has no end tag to balance the count
            self._break(tag)

    def handle_endtag(self, tag):
        if tag in _DROPPED and self.dropped:
            self.dropped -= 1
        if tag == "head":
            self.in_head = False
        if tag == self.collecting:
            self.collecting = None
        self.pre -= tag == "pre" and self.pre > 0
        self._break(tag)

    def handle_data(self, data):
        if self.dropped:
            return
        text = data if self.pre else re.sub(r"\s+", " ", data)
        if self.collecting:
            self.titles[self.collecting].append(text)
        if not self.in_head and self.collecting != "title":
            self.parts.append(text)

    def _break(self, tag):
        if tag in _PARAGRAPHS or tag in _LINES:
            self.parts.append(2 if tag in _PARAGRAPHS else 1)  # newlines to come; adjacent ones merge
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def result(self) -> tuple[str, str | None]:
        out, newlines = [], 0
        for part in self.parts:
            if isinstance(part, int):
                newlines = max(newlines, part)
            elif part.strip() or not newlines:
                out += ["\n" * newlines, part]
                newlines = 0
        text = re.sub(r"[^\S\n]+", " ", "".join(out))
        text = re.sub(r" ?\n ?", "\n", text).strip()
        titles = (re.sub(r"\s+", " ", "".join(self.titles.get(tag, []))).strip() for tag in ("h1", "title"))
        return text, next((t for t in titles if t), None)


# Where a sentence may end: after . ! ? (and closing quotes or brackets) before white space; before a line
# that starts a markdown heading, list item or quote; after a heading line. Blank lines end paragraphs.
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
_SENTENCE_END = re.compile(r"""(?<!^\d)(?<!^\d\d)[.!?]+["'\u201d\u2019)\]]*(?=\s)  # not "1. " starting a list
                              | \n(?=[ \t]*(?:\#{1,6}[ \t]|[-*+][ \t]|\d{1,3}[.)][ \t]|>))
                              | ^[ \t]{0,3}\#{1,6}[ \t][^\n]*""", re.X | re.M)


def cut_passages(document: Document, count_tokens: Callable[[str], int], max_tokens: int = 192,
                 overlap_sentences: int = 1) -> list[DocumentPassage]:
    """The document as passages of whole sentences, each at most `max_tokens` by `count_tokens` (a single
    word longer than that is a passage of its own); a sentence too long is cut at words. A passage ends at
    a paragraph break once it is half full, and the next one repeats its last `overlap_sentences`
    sentences when they take at most half the budget."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    text = document.text
    overhead = count_tokens("")  # special tokens the counter adds to any text: once per passage, not per sentence

    def cost(span) -> int:
        return count_tokens(text[span[0]:span[1]]) - overhead

    sentences: list[tuple[int, int, bool]] = []  # (start, end, ends a paragraph)
    for start, end, paragraph_end in sentence_spans(text):
        if cost((start, end)) + overhead <= max_tokens:
            sentences.append((start, end, paragraph_end))
            continue
        words = [(start + m.start(), start + m.end(), False) for m in re.finditer(r"\S+", text[start:end])]
        windows = _pack(words, [cost(w) for w in words], cost, max_tokens - overhead, 0)
        sentences += [(s, e, paragraph_end and e == end) for s, e in windows]
    bounds = _pack(sentences, [cost(s) for s in sentences], cost, max_tokens - overhead, overlap_sentences)
    return [DocumentPassage(f"{document.source}#{n}", document.title, text[s:e], document.source, s, e)
            for n, (s, e) in enumerate(bounds)]


def _pack(spans: list[tuple[int, int, bool]], costs: list[int], cost, budget: int, overlap: int) -> list[tuple[int, int]]:
    """Consecutive spans packed greedily into (start, end) runs within the budget. The costs are summed
    per span, so each run is measured whole as well, for tokenizers whose counts do not add up."""
    runs: list[tuple[int, int]] = []
    first = fresh = 0  # the run's first span; the first span no run holds yet
    while fresh < len(spans):
        stop, total = first, 0
        while stop < len(spans) and (stop == fresh or total + costs[stop] <= budget):
            total, stop = total + costs[stop], stop + 1
        if stop < len(spans):  # rather end at the last paragraph break past half the budget
            breaks = [i + 1 for i in range(fresh, stop) if spans[i][2] and 2 * sum(costs[first:i + 1]) >= budget]
            stop = breaks[-1] if breaks else stop
        while stop - 1 > fresh and cost((spans[first][0], spans[stop - 1][1])) > budget:
            stop -= 1
        if first < fresh and cost((spans[first][0], spans[stop - 1][1])) > budget:
            first = fresh  # the repeated spans do not fit beside even one new one
            continue
        runs.append((spans[first][0], spans[stop - 1][1]))
        fresh = first = stop
        for back in range(min(overlap, stop - 1), 0, -1):  # repeat what fits in half, leaving room for new
            repeated = sum(costs[stop - back:stop])
            if 2 * repeated <= budget and stop < len(spans) and repeated + costs[stop] <= budget:
                first = stop - back
                break
    return runs


def sentence_spans(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, ends a paragraph) of each sentence, white space outside the span."""
    out: list[tuple[int, int, bool]] = []
    paragraphs = [0, *(i for m in _PARAGRAPH_BREAK.finditer(text) for i in m.span()), len(text)]
    for begin, end in zip(paragraphs[::2], paragraphs[1::2]):
        cuts = sorted({m.end() for m in _SENTENCE_END.finditer(text, begin, end)} | {end})
        spans = [_trim(text, a, b) for a, b in zip([begin, *cuts], cuts)]
        spans = [(a, b) for a, b in spans if a < b]
        out += [(a, b, i == len(spans) - 1) for i, (a, b) in enumerate(spans)]
    return out


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
