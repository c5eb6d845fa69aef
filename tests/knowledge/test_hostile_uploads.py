"""Case 11: hostile uploads. Path traversal and NUL bytes in file names end up as a plain label (the
bytes are stored in the database under the row's id, never at a path taken from the name); a .docx
decompression bomb, a PDF whose page tree loops and files whose extension lies are each refused or
failed with a reason, in bounded time and memory, and the worker keeps serving."""

import io
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from knowledge import parsing
from knowledge.models import Chunk, Document
from tests.chat.test_predict_errors import assert_error
from tests.knowledge.conftest import docx_file, documents_url, pdf_file, txt_file, upload, wait_done
from tests.knowledge.test_bad_input import nothing_stored  # noqa: F401 (fixture)


def raw_multipart_upload(base, token, kb, file_name: bytes, data: bytes) -> requests.Response:
    """A multipart upload whose file name goes on the wire byte for byte (requests would escape it)."""
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="' + file_name + b'"\r\n'
        + b"Content-Type: application/octet-stream\r\n\r\n"
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Authorization": token, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    return requests.post(documents_url(base, kb), data=body, headers=headers, timeout=120)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), which only ever grows."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def docx_bomb(unpacked_mb: int) -> bytes:
    """A .docx-shaped zip whose document.xml unpacks to `unpacked_mb` MiB of spaces (a few hundred KiB packed)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>')
        with archive.open("word/document.xml", "w", force_zip64=True) as member:
            chunk = b" " * (1024 * 1024)
            for _ in range(unpacked_mb):
                member.write(chunk)
    return out.getvalue()


def looping_pdf() -> bytes:
    """A PDF whose page tree is a cycle (2 -> 3 -> 2): a naive parser walks it forever."""
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        3: b"<< /Type /Pages /Kids [2 0 R] /Parent 2 0 R /Count 1 >>",
    }
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = {}
    for number, body in objects.items():
        offsets[number] = out.tell()
        out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    for number in objects:
        out.write(f"{offsets[number]:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


@pytest.mark.parametrize(
    "sent, stored",
    [
        (b"../../../../tmp/evil-{tag}.txt", "evil-{tag}.txt"),
        (b"..\\..\\windows\\evil-{tag}.txt", "evil-{tag}.txt"),
        (b"/etc/cron.d/evil-{tag}.md", "evil-{tag}.md"),
        (b"nul\x00byte-{tag}.txt", "nulbyte-{tag}.txt"),
        (b"nul-{tag}.txt\x00.exe", "nul-{tag}.txt.exe"),
    ],
)
def test_a_traversal_or_nul_file_name_is_kept_only_as_a_plain_label(stack, token, kb, sent, stored):
    tag = uuid.uuid4().hex[:8]
    sent, stored = sent.replace(b"{tag}", tag.encode()), stored.format(tag=tag)
    data = txt_file(f"The lighthouse of Quarn {tag} is painted green.")
    response = raw_multipart_upload(stack.url, token, kb.name, sent, data)
    if stored.endswith(".exe"):  # the NUL did not hide the real extension
        assert_error(response, 400, "invalid_request_error", "file")
        assert not Document.objects.filter(knowledge_base=kb).exists()
        return
    assert response.status_code == 202, response.text
    document = Document.objects.get(pk=response.json()["id"])
    assert document.name == stored and "\x00" not in document.name and "/" not in document.name
    assert bytes(document.content) == data  # in the database, not in a file named after the upload
    for where in (Path("/tmp") / stored, Path("/etc/cron.d") / stored, Path.cwd() / stored):
        assert not where.exists(), where
    assert wait_done(stack.url, token, kb.name, document.pk)["status"] == "ready"


def test_the_service_strips_traversal_and_control_characters_from_names(kb):
    from knowledge import services
    from knowledge.errors import BadUpload

    document, _ = services.document_create(knowledge_base=kb, name="..\x00/..\x01/re\x00port.md", data=b"# Report\n\ntext")
    assert document.name == "report.md"
    with pytest.raises(BadUpload, match="name"):
        services.document_create(knowledge_base=kb, name="../..", data=b"text")


def test_a_docx_decompression_bomb_is_refused_unpacked_with_its_size(stack, token, kb, nothing_stored, settings):
    bomb = docx_bomb(unpacked_mb=300)
    assert len(bomb) < 2 * 1024 * 1024
    error = assert_error(upload(stack.url, token, kb.name, "bomb.docx", bomb), 400, "invalid_request_error", "file")
    assert "zip bomb" in error["message"] and str(settings.KNOWLEDGE_MAX_UNPACKED_BYTES) in error["message"]

    # The worker's parser checks the same before python-docx unpacks anything: bounded memory.
    before = peak_rss_bytes()
    with pytest.raises(parsing.ParseError, match="zip bomb"):
        parsing.parse("bomb.docx", bomb)
    assert peak_rss_bytes() - before < 50 * 1024 * 1024


def test_a_pdf_whose_page_tree_loops_fails_with_a_reason_and_the_worker_goes_on(stack, token, kb):
    response = upload(stack.url, token, kb.name, "loop.pdf", looping_pdf())
    assert response.status_code == 202, response.text
    done = wait_done(stack.url, token, kb.name, response.json()["id"])
    assert done["status"] == "failed"
    assert "PDF" in done["error"] and "cyclic" in done["error"]
    assert not Chunk.objects.filter(document_id=done["id"]).exists()
    assert stack.worker.alive()

    good = upload(stack.url, token, kb.name, "after-loop.txt", txt_file("The ferry of Dunmarrow leaves at dawn.")).json()
    assert wait_done(stack.url, token, kb.name, good["id"])["status"] == "ready"


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("photo.pdf", b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "not a PDF"),
        ("report.docx", None, "not a .docx"),  # a real PDF named .docx
        ("notes.txt", b"\x89PNG\r\n\x1a\n\xff\xfe" + b"\x00\x81" * 100, "not UTF-8"),
        ("notes.md", "Ünïcödé in Latin-1".encode("latin-1"), "not UTF-8"),
    ],
)
def test_a_file_whose_extension_lies_about_its_type_is_refused_with_a_reason(stack, token, kb, nothing_stored, name, data, reason):
    data = data if data is not None else pdf_file("A PDF in disguise.")
    error = assert_error(upload(stack.url, token, kb.name, name, data), 400, "invalid_request_error", "file")
    assert reason in error["message"] and name in error["message"]


def test_a_zip_that_is_not_a_docx_fails_with_a_reason(stack, token, kb):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "just a zip")
    response = upload(stack.url, token, kb.name, "archive.docx", out.getvalue())
    assert response.status_code == 202, response.text
    done = wait_done(stack.url, token, kb.name, response.json()["id"])
    assert done["status"] == "failed" and ".docx" in done["error"]
    # A real .docx of the same knowledge base is still read.
    good = upload(stack.url, token, kb.name, "real.docx", docx_file("Real", "The bell of Orrin rings twice.")).json()
    assert wait_done(stack.url, token, kb.name, good["id"])["status"] == "ready"
