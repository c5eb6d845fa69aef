"""From an uploaded file's bytes to text sections, and from sections to chunks, with kept libraries.

.txt and .md are UTF-8 text, .docx is read by python-docx (its heading styles become Markdown
headings), .pdf by pypdf (one section per page). Splitting is langchain-text-splitters': Markdown
headings first, then paragraphs, lines and words down to the chunk size.
"""

import io
import zipfile
from dataclasses import dataclass

from django.conf import settings

from llmsite.text import storable

SUPPORTED_TYPES = ("txt", "md", "docx", "pdf")
MARKDOWN_HEADINGS = [("#", "h1"), ("##", "h2"), ("###", "h3"), ("####", "h4")]


class ParseError(Exception):
    """The file cannot be read as its type says; the message is shown to the user."""


@dataclass
class Section:
    text: str
    heading: str = ""
    page: int | None = None


@dataclass
class Piece:
    text: str
    heading: str = ""
    page: int | None = None


def file_type(name: str) -> str:
    """The lower-case extension of a file name ("" when it has none)."""
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(f"The file is not UTF-8 text (invalid byte at position {exc.start}).") from None


def _markdown_sections(text: str) -> list[Section]:
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    splitter = MarkdownHeaderTextSplitter(headers_to_split_on=MARKDOWN_HEADINGS, strip_headers=False)
    sections = []
    for doc in splitter.split_text(text):
        headings = [doc.metadata[key] for _, key in MARKDOWN_HEADINGS if key in doc.metadata]
        sections.append(Section(doc.page_content, heading=" / ".join(headings)))
    return sections


def check_content(name: str, data: bytes) -> None:
    """Refuse, before anything is stored or parsed, a file whose bytes are not what its extension
    says, and a .docx that would unpack to more than KNOWLEDGE_MAX_UNPACKED_BYTES (a zip bomb).

    Cheap: it reads the first bytes and the zip's directory only. The parsers check again on the worker.
    """
    kind = file_type(name)
    if kind in ("txt", "md"):
        _text(data)
    elif kind == "pdf" and b"%PDF-" not in data[:1024]:
        raise ParseError("The file is named .pdf but is not a PDF (it does not start with %PDF-).")
    elif kind == "docx":
        _check_docx_container(data)


def _check_docx_container(data: bytes) -> None:
    limit = settings.KNOWLEDGE_MAX_UNPACKED_BYTES
    if not data.startswith(b"PK\x03\x04"):
        raise ParseError("The file is named .docx but is not a .docx document (not a zip archive).")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ParseError(f"The file is not a readable .docx document ({exc}).") from None
    if len(members) > 10_000:
        raise ParseError(f"The .docx archive holds {len(members)} files; a document holds far fewer.")
    # zipfile never returns more than a member's declared size (a lying header fails its CRC), so
    # the declared sizes bound what python-docx can unpack.
    unpacked = sum(member.file_size for member in members)
    if unpacked > limit:
        raise ParseError(
            f"The .docx would unpack to {unpacked} bytes, over the limit of {limit} bytes "
            "(KNOWLEDGE_MAX_UNPACKED_BYTES): it looks like a zip bomb."
        )


def _docx_as_markdown(data: bytes) -> str:
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    _check_docx_container(data)
    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, OSError) as exc:
        raise ParseError(f"The file is not a readable .docx document ({exc}).") from None
    except Exception as exc:  # zipfile.BadZipFile, lxml errors: all mean a broken file
        raise ParseError(f"The file is not a readable .docx document ({type(exc).__name__}: {exc}).") from None
    lines = []
    for paragraph in document.paragraphs:
        text = paragraph.text.strip()
        if not text:
            continue
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        if style == "Title":
            lines.append(f"# {text}")
        elif style.startswith("Heading ") and style[8:].isdigit():
            lines.append("#" * min(int(style[8:]), 4) + f" {text}")
        else:
            lines.append(text)
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n\n".join(lines)


def _pdf_sections(data: bytes) -> list[Section]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ParseError("The PDF is encrypted: upload a copy without a password.")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ParseError:
        raise
    except Exception as exc:  # pypdf raises PdfReadError and many others on broken files
        raise ParseError(f"The file is not a readable PDF ({type(exc).__name__}: {exc}).") from None
    return [Section(text, page=number) for number, text in enumerate(pages, start=1) if text.strip()]


def parse(name: str, data: bytes) -> list[Section]:
    """The text sections of a file; raises ParseError with a readable reason."""
    kind = file_type(name)
    if kind == "txt":
        sections = [Section(_text(data))]
    elif kind == "md":
        sections = _markdown_sections(_text(data))
    elif kind == "docx":
        sections = _markdown_sections(_docx_as_markdown(data))
    elif kind == "pdf":
        sections = _pdf_sections(data)
    else:
        raise ParseError(f"Unsupported file type '.{kind}': use one of {', '.join('.' + t for t in SUPPORTED_TYPES)}.")
    # PostgreSQL text refuses NUL, which PDFs' text and plain text files can hold: U+FFFD shows where.
    sections = [
        Section(storable(s.text), heading=storable(s.heading), page=s.page) for s in sections if s.text.replace("\x00", "").strip()
    ]
    if not sections:
        raise ParseError("The file contains no text.")
    return sections


def split(sections: list[Section], *, chunk_size: int, chunk_overlap: int) -> list[Piece]:
    """Chunks of at most `chunk_size` characters, cut at paragraphs, then lines, then words."""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    splitter = RecursiveCharacterTextSplitter(
        chunk_size=chunk_size, chunk_overlap=min(chunk_overlap, chunk_size // 2), strip_whitespace=True
    )
    pieces = []
    for section in sections:
        for text in splitter.split_text(section.text):
            if text.strip():
                pieces.append(Piece(text, heading=section.heading[:500], page=section.page))
    return pieces
