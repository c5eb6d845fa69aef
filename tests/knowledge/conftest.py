"""Knowledge-base tests: files built here (each with a made-up fact), uploads through the real API,
ingestion by the real worker with the real embedding model, answers from the real default model."""

import io
import time
import uuid

import pytest
import requests

INGEST_TIMEOUT = 300  # a deadline for polling, not a speed check


def txt_file(*paragraphs: str) -> bytes:
    return "\n\n".join(paragraphs).encode()


def md_file(title: str, *paragraphs: str) -> bytes:
    return (f"# {title}\n\n" + "\n\n".join(f"## Part {n}\n\n{p}" for n, p in enumerate(paragraphs, 1))).encode()


def docx_file(title: str, *paragraphs: str) -> bytes:
    import docx

    document = docx.Document()
    document.add_heading(title, level=1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def pdf_file(*paragraphs: str) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    for paragraph in paragraphs:
        pdf.multi_cell(0, 8, paragraph, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)
    return bytes(pdf.output())


def documents_url(base: str, kb: str) -> str:
    return f"{base}/api/knowledge/{kb}/documents"


def upload(base: str, token: str, kb: str, name: str, data: bytes) -> requests.Response:
    return requests.post(documents_url(base, kb), headers={"Authorization": token}, files={"file": (name, data)}, timeout=120)


def wait_done(base: str, token: str, kb: str, document_id: int) -> dict:
    """Poll the document's status until ingestion ends (ready or failed)."""
    deadline = time.monotonic() + INGEST_TIMEOUT
    while True:
        response = requests.get(f"{documents_url(base, kb)}/{document_id}", headers={"Authorization": token}, timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()
        if data["status"] in ("ready", "failed"):
            return data
        assert time.monotonic() < deadline, f"ingestion did not end: {data}"
        time.sleep(0.3)


@pytest.fixture
def kb(user):
    from knowledge.models import KnowledgeBase

    return KnowledgeBase.objects.create(name=f"kb-{uuid.uuid4().hex[:10]}", owner=user)
