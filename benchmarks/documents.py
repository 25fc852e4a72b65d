"""A user's own documents on the device, measured (runtime.documents, runtime.corpus):

  ingest            documents and passages per second by file type (.txt, .md, .html, .pdf), and the
                    bundle's growth per 1,000 passages: `edgerag add` on a copy of a bundle
  updated-vs-fresh  a bundle changed on the device against a fresh export of the same articles:
                    export half of a SQuAD file's articles, sync the other half as markdown files,
                    remove a quarter of those, then compare retrieval and F1 on the remaining
                    articles' questions with a fresh export of them (workstation: it exports)

Retrieval is scored as "the answer is in a top-5 passage of the gold article" (answer_in_top5):
synced passages are cut from whole documents, so the gold paragraph's id means nothing there.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edgerag.data import Question, read_squad
from edgerag.metrics import best_over_references, exact_match, f1
from edgerag.runtime import Pipeline
from edgerag.runtime.corpus import ChangeOptions, add_documents, corpus_files, sync_documents
from edgerag.runtime.manifest import read_manifest

PROG = "python -m edgerag.benchmarks.documents"
FILE_TYPES = (".txt", ".md", ".html", ".pdf")


def write_pdf(path: Path, pages: list[str]) -> Path:
    """A minimal valid PDF: one Helvetica text line per page, with its xref table (what the tests and
    this benchmark read with pypdf; no PDF writer library needed)."""
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode()]
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode("latin-1", "replace")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 {3 + 2 * n} 0 R >> >> >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def articles_of(squad_path) -> dict[str, list[str]]:
    """{title: paragraphs} in file order."""
    passages, _, _ = read_squad(squad_path)
    out: dict[str, list[str]] = {}
    for p in passages:
        out.setdefault(p.title, []).append(p.text)
    return out


def write_article(folder: Path, title: str, paragraphs: list[str], suffix: str) -> Path:
    stem = "".join(c if c.isalnum() else "_" for c in title)[:60]
    path = folder / f"{stem}{suffix}"
    if suffix == ".md":
        path.write_text(f"# {title}\n\n" + "\n\n".join(paragraphs) + "\n")
    elif suffix == ".txt":
        path.write_text("\n\n".join(paragraphs) + "\n")
    elif suffix == ".html":
        body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
        path.write_text(f"<html><head><title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
                        f"{body}</body></html>")
    else:
        write_pdf(path, paragraphs)
    return path


def corpus_bytes(bundle: Path) -> int:
    return sum((bundle / name).stat().st_size for name in corpus_files(read_manifest(bundle)))


def ingest(bundle: Path, squad_path, articles: int) -> list[dict]:
    chosen = list(articles_of(squad_path).items())[:articles]
    rows = []
    for suffix in FILE_TYPES:
        with tempfile.TemporaryDirectory() as tmp:
            copy, folder = Path(tmp) / "bundle", Path(tmp) / "docs"
            shutil.copytree(bundle, copy)
            folder.mkdir()
            for title, paragraphs in chosen:
                write_article(folder, title, paragraphs, suffix)
            before = corpus_bytes(copy)
            started = time.perf_counter()
            change = add_documents(copy, [folder])
            seconds = time.perf_counter() - started
            rows.append({"type": suffix, "documents": len(change.added), "passages": change.passages_added,
                         "skipped": len(change.skipped), "seconds": round(seconds, 2),
                         "documents_per_s": round(len(change.added) / seconds, 2),
                         "passages_per_s": round(change.passages_added / seconds, 1),
                         "file_bytes": sum(p.stat().st_size for p in folder.iterdir()),
                         "bundle_mb_per_1000_passages": round((corpus_bytes(copy) - before) / 1e6
                                                              / max(change.passages_added, 1) * 1000, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(bundle: Path, questions: list[Question], titles: dict[str, str]) -> dict:
    """EM, F1 and answer_in_top5 (a top-5 passage of the gold article holds a gold answer)."""
    pipeline = Pipeline.load(bundle)
    em = f1s = hits = 0.0
    for q in questions:
        answer = pipeline.ask(q.question)
        em += best_over_references(exact_match, answer.answer, q.answers)
        f1s += best_over_references(f1, answer.answer, q.answers)
        top = pipeline.retrieve(q.question, k=5)
        hits += any(p["title"] == titles[q.passage_id] and any(a in p["text"] for a in q.answers) for p in top)
    n = len(questions)
    return {"questions": n, "em": round(100 * em / n, 2), "f1": round(100 * f1s / n, 2),
            "answer_in_top5": round(100 * hits / n, 2), "passages": pipeline.size}


def write_squad(path: Path, articles: dict[str, list[str]], squad_path) -> None:
    """A SQuAD file of the given articles, their questions kept (export samples its parity prompts from them)."""
    raw = gzip.open(squad_path).read() if str(squad_path).endswith(".gz") else Path(squad_path).read_bytes()
    data = json.loads(raw)
    kept = [a for a in data["data"] if a.get("title", "").replace("_", " ") in articles]  # read_squad's titles
    assert len(kept) == len(articles), "every article written"
    path.write_text(json.dumps({"version": "1.1", "data": kept}))


def updated_vs_fresh(student: Path, squad_path, n: int, work: Path, seed: int = 0,
                     kinds=("paragraphs", "files"), options: ChangeOptions | None = None) -> dict:
    """Two ways of bringing the exported half in: as its SQuAD paragraphs (the synced half is cut from
    files either way, so passages differ from a fresh export's) and as the same markdown files (the same
    passages either way: what is left is the change itself)."""
    articles = articles_of(squad_path)
    titles = sorted(articles)
    random.Random(seed).shuffle(titles)
    exported, synced = titles[:len(titles) // 2], titles[len(titles) // 2:]
    removed = synced[:len(synced) // 4]
    remaining = [t for t in titles if t in set(exported) | (set(synced) - set(removed))]
    passages, questions, _ = read_squad(squad_path)
    title_of = {p.id: p.title for p in passages}
    pool = [q for q in questions if title_of[q.passage_id] in set(remaining)]
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    result = {"articles": {"exported": len(exported), "synced": len(synced), "removed": len(removed)},
              "questions": len(chosen)}
    for kind in kinds:
        result[kind] = _updated_and_fresh(kind, student, squad_path, articles, exported, synced, removed, remaining,
                                          work / kind, chosen, title_of, options)
        print(json.dumps({kind: result[kind]}, indent=2), flush=True)
    return result


def _updated_and_fresh(kind: str, student: Path, squad_path, articles: dict, exported: list, synced: list,
                       removed: list, remaining: list, work: Path, questions: list, title_of: dict,
                       options: ChangeOptions | None) -> dict:
    from edgerag.cli import main as edgerag

    work.mkdir(parents=True, exist_ok=True)
    if (work / "result.json").exists() and (work / "updated" / "manifest.json").exists():
        saved = json.loads((work / "result.json").read_text())  # this variant ran to its end before
        if saved["updated"]["questions"] == len(questions):
            return saved

    def corpus(name: str, chosen: list[str]) -> Path:
        if kind == "paragraphs":
            path = work / f"{name}.json"
            write_squad(path, {t: articles[t] for t in chosen}, squad_path)
            return path
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for t in chosen:
            write_article(folder, t, articles[t], ".md")
        return folder

    out = {}
    updated = work / "updated"
    if not (updated / "manifest.json").exists():
        first = corpus("exported", exported)
        assert edgerag(["export", str(student), "--passages", str(first), "--out", str(updated), "--overwrite"]) == 0
        # files: the user's folder gets the other half, then loses a quarter of it (sync mirrors a folder);
        # paragraphs: the exported passages have no source, and the synced folder holds the other half only
        folder = first if kind == "files" else work / "synced"
        if kind != "files":
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        paths = {t: write_article(folder, t, articles[t], ".md") for t in synced}
        out["sync_add_s"] = round(sync_documents(updated, folder, options).seconds, 2)
        for t in removed:
            paths[t].unlink()
        out["sync_remove_s"] = round(sync_documents(updated, folder, options).seconds, 2)
    fresh = work / "fresh"
    if not (fresh / "manifest.json").exists():
        assert edgerag(["export", str(student), "--passages", str(corpus("remaining", remaining)), "--out", str(fresh),
                        "--overwrite"]) == 0
    out["updated"] = quality(updated, questions, title_of)
    out["fresh"] = quality(fresh, questions, title_of)
    (work / "result.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("ingest", help="edgerag add's rate by file type, on a copy of BUNDLE")
    i.add_argument("bundle", type=Path)
    i.add_argument("--squad", default="../shared/data/xquad-en.json.gz", help="articles to write as files")
    i.add_argument("--articles", type=int, default=24)
    u = sub.add_parser("updated-vs-fresh", help="a bundle synced on the device against a fresh export (workstation)")
    u.add_argument("student", type=Path, help="a run's student/ folder")
    u.add_argument("--squad", default="../shared/data/xquad-en.json.gz")
    u.add_argument("--n", type=int, default=200, help="questions of the remaining articles, sampled")
    u.add_argument("--work", type=Path, required=True, help="folder for the bundles (kept, reused if there)")
    u.add_argument("--kinds", default="paragraphs,files", help="how the exported half comes in: paragraphs, files")
    u.add_argument("--overlap-sentences", type=int, default=1, help="sentences a synced passage repeats")
    for p in (i, u):
        p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.command == "ingest":
        result = ingest(args.bundle, args.squad, args.articles)
    else:
        result = updated_vs_fresh(args.student, args.squad, args.n, args.work, kinds=args.kinds.split(","),
                                  options=ChangeOptions(overlap_sentences=args.overlap_sentences))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
