// The knowledge-base page: upload by drag and drop (or the file input), and each document's
// status and progress, polled from documents.json. Names and errors are written as text only.

const table = document.getElementById("documents");
const body = table.querySelector("tbody");
const form = document.getElementById("upload");
const errorBox = document.getElementById("upload-error");
const csrf = document.querySelector("input[name=csrfmiddlewaretoken]")?.value;
const mayChange = Boolean(form);
const POLL_MS = 1000;
let timer = null;

function cell(className, ...children) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.append(...children);
  return td;
}

function deleteForm(doc) {
  const f = document.createElement("form");
  f.method = "post";
  f.action = `${table.dataset.url.replace(/documents\.json$/, "")}documents/${doc.id}/delete`;
  f.dataset.confirm = `Delete “${doc.name}” and its chunks?`;
  const token = document.createElement("input");
  token.type = "hidden";
  token.name = "csrfmiddlewaretoken";
  token.value = csrf;
  const button = document.createElement("button");
  button.type = "submit";
  button.className = "danger";
  button.textContent = "Delete";
  button.setAttribute("aria-label", `Delete ${doc.name}`);
  f.append(token, button);
  return f;
}

function row(doc) {
  const tr = document.createElement("tr");
  tr.dataset.documentId = doc.id;
  tr.dataset.status = doc.status;
  const progress = document.createElement("progress");
  progress.max = doc.chunks_total || 1;
  progress.value = doc.status === "ready" ? progress.max : doc.chunks_done;
  tr.append(
    cell("doc-name", doc.name),
    cell("doc-status", doc.error ? `${doc.status}: ${doc.error}` : doc.status),
    cell("doc-progress", progress, ` ${doc.chunks_done}/${doc.chunks_total}`),
    cell("", ...(mayChange ? [deleteForm(doc)] : [])),
  );
  return tr;
}

function pending(docs) {
  return docs.some((doc) => doc.status !== "ready" && doc.status !== "failed");
}

function show(docs) {
  body.replaceChildren(...docs.map(row));
  document.getElementById("no-documents").hidden = docs.length > 0;
}

async function poll() {
  timer = null;
  try {
    const response = await fetch(table.dataset.url, { headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const { documents } = await response.json();
    show(documents);
    if (pending(documents)) schedule();
  } catch {
    schedule(POLL_MS * 5); // the server is busy or restarting: try again later
  }
}

function schedule(ms = POLL_MS) {
  if (timer === null) timer = setTimeout(poll, ms);
}

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
}

async function upload(files) {
  showError("");
  for (const file of files) {
    const data = new FormData();
    data.append("file", file, file.name);
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: data,
        headers: { Accept: "application/json", "X-CSRFToken": csrf },
      });
      const result = await response.json();
      if (!response.ok) showError(result.error || `The upload failed (${response.status}).`);
    } catch (error) {
      showError(`The upload of “${file.name}” failed: ${error.message}`);
    }
  }
  clearTimeout(timer);
  timer = null;
  poll();
}

if (form) {
  const input = document.getElementById("file");
  input.addEventListener("change", () => {
    if (input.files.length) upload([...input.files]).then(() => { input.value = ""; });
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.files.length) upload([...input.files]).then(() => { input.value = ""; });
  });
  for (const name of ["dragenter", "dragover"]) {
    form.addEventListener(name, (event) => {
      event.preventDefault();
      form.classList.add("dragging");
    });
  }
  form.addEventListener("dragleave", () => form.classList.remove("dragging"));
  form.addEventListener("drop", (event) => {
    event.preventDefault();
    form.classList.remove("dragging");
    if (event.dataTransfer.files.length) upload([...event.dataTransfer.files]);
  });
}

// Delete asks first (rows are rebuilt by polling, so the listener sits on the table).
table.addEventListener("submit", (event) => {
  const target = event.target;
  if (target.dataset.confirm && !window.confirm(target.dataset.confirm)) event.preventDefault();
});

if ([...body.querySelectorAll("tr")].some((tr) => !["ready", "failed"].includes(tr.dataset.status))) schedule();
