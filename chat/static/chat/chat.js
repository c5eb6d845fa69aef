// The chat page: sends messages over the browser WebSocket, streams answers in, Stop, Regenerate.
// Model output goes through renderMarkdown (sanitised); everything else is set as text.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const messagesEl = $("messages");
const messageBox = $("message");
const sendButton = $("send");
const stopButton = $("stop");
const regenerateButton = $("regenerate");
const errorEl = $("chat-error");
const deploymentSelect = $("deployment");
const defaults = JSON.parse($("deployment-defaults").textContent);

const state = {
  conversation: $("conversation-id") ? JSON.parse($("conversation-id").textContent) : null,
  socket: null,
  outbox: [],
  streaming: false, // a request is out: from Send until its "done" (or "error")
  stopped: false,
  pendingQuestion: null, // the question shown before the server stored it
  replacedAnswer: null, // the answer Regenerate took off the page, put back if nothing starts
  answer: null, // {turn, article, text, request, lastEvent} of the answer being streamed
  renderQueued: false,
};

// --- rendering --------------------------------------------------------------------------------

function turnElement(role, content) {
  const turn = document.createElement("div");
  turn.className = `turn turn-${role}`;
  const article = document.createElement("article");
  article.className = role === "assistant" ? "message markdown" : "message";
  article.dataset.role = role;
  if (role === "assistant") renderMarkdown(article, content);
  else article.textContent = content;
  turn.append(article);
  if (role === "assistant") {
    const sources = document.createElement("div");
    sources.className = "sources";
    sources.hidden = true;
    turn.append(sources);
  }
  $("empty-hint").hidden = true;
  messagesEl.append(turn);
  return turn;
}

function setNote(turn, text, isError) {
  turn.querySelector(".note")?.remove();
  if (!text) return;
  const note = document.createElement("p");
  note.className = isError ? "note error" : "note";
  note.textContent = text;
  turn.append(note);
}

// Sources under an answer (knowledge bases): document name and excerpt, as text only.
export function showSources(turn, sources) {
  const box = turn.querySelector(".sources");
  box.replaceChildren();
  const heading = document.createElement("p");
  heading.className = "sources-title";
  heading.textContent = "Sources";
  const list = document.createElement("ol");
  for (const source of sources) {
    const item = document.createElement("li");
    const name = document.createElement("strong");
    name.textContent = source.document;
    const excerpt = document.createElement("blockquote");
    excerpt.textContent = source.text;
    item.append(name, excerpt);
    list.append(item);
  }
  box.append(heading, list);
  box.hidden = sources.length === 0;
}

function nearBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 120 ||
    messagesEl.scrollHeight - messagesEl.scrollTop - messagesEl.clientHeight < 120;
}

function scrollDown() {
  messagesEl.scrollTop = messagesEl.scrollHeight;
}

function renderAnswer() {
  state.renderQueued = false;
  if (!state.answer) return;
  const follow = nearBottom();
  renderMarkdown(state.answer.article, state.answer.text);
  if (follow) scrollDown();
}

function queueRender() {
  if (!state.renderQueued) {
    state.renderQueued = true;
    requestAnimationFrame(renderAnswer);
  }
}

function updateButtons() {
  sendButton.disabled = state.streaming;
  stopButton.disabled = !state.streaming || state.stopped;
  const last = messagesEl.querySelector(".turn:last-of-type");
  regenerateButton.disabled = state.streaming || !state.conversation || !last || !last.classList.contains("turn-assistant");
}

function showError(text) {
  errorEl.textContent = text || "";
  errorEl.hidden = !text;
}

// --- the socket -------------------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
  state.socket = socket;
  socket.addEventListener("open", () => {
    for (const message of state.outbox.splice(0)) socket.send(JSON.stringify(message));
  });
  socket.addEventListener("message", (event) => handle(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    if (event.code === 4401) {
      showError("Your session ended: log in again.");
      return;
    }
    if (state.streaming && state.answer && state.answer.request) {
      // The answer runs on for a grace period: the next connection resumes it after the last event seen.
      state.outbox.unshift({ type: "resume", request: state.answer.request, last_event: state.answer.lastEvent });
    } else if (state.streaming) {
      if (state.answer) setNote(state.answer.turn, "The connection dropped; reload to see the stored answer.", true);
      finishRequest();
    }
    setTimeout(connect, 1000);
  });
}

function send(message) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify(message));
  else state.outbox.push(message);
}

function handle(message) {
  if (message.type === "turn") onTurn(message);
  else if (message.type === "request" && state.answer) state.answer.request = message.request;
  else if (message.type === "delta") onDelta(message);
  else if (message.type === "queued") onQueued(message);
  else if (message.type === "loading") onLoading(message);
  else if (message.type === "sources" && state.answer) {
    state.answer.lastEvent = message.id;
    showSources(state.answer.turn, message.sources);
  }
  else if (message.type === "done") onDone(message);
  else if (message.type === "error") onError(message);
  else if (message.type === "usage") $("token-usage").textContent = message.text;
}

function onTurn(message) {
  if (message.created || state.conversation !== message.conversation.id) {
    state.conversation = message.conversation.id;
    history.replaceState(null, "", message.conversation.url);
    $("conversation-title").textContent = message.conversation.title;
    document.title = `${message.conversation.title} · LLM site`;
    addRecent(message.conversation);
  }
  if (state.pendingQuestion) {
    state.pendingQuestion.dataset.messageId = message.question.id;
    state.pendingQuestion = null;
  }
  state.replacedAnswer = null;
  const turn = turnElement("assistant", "");
  turn.dataset.messageId = message.answer.id;
  turn.dataset.status = "streaming";
  turn.classList.add("streaming");
  state.answer = { turn, article: turn.querySelector("article"), text: "", request: null, lastEvent: "0" };
  if (state.stopped) send({ type: "stop" }); // Stop was pressed before the answer existed
  scrollDown();
  updateButtons();
}

// The place in line, shown in place of the answer until its first token.
export function waitingText(position, waitSeconds) {
  const ahead = position === 0 ? "you are next" : `${position} ahead of you`;
  const estimate = waitSeconds == null ? "" : ` (about ${Math.max(1, Math.round(waitSeconds))} s)`;
  return `Waiting: ${ahead}${estimate}`;
}

function onQueued(message) {
  showWaiting(waitingText(message.position, message.wait_seconds));
}

function onLoading(message) {
  const where = message.worker ? ` on ${message.worker}` : "";
  showWaiting(`Loading the model${where}… (${Math.round(message.seconds)} s)`);
}

function showWaiting(text) {
  if (!state.answer || state.answer.text) return;
  const waiting = document.createElement("p");
  waiting.className = "waiting";
  waiting.textContent = text;
  state.answer.article.replaceChildren(waiting);
}

function onDelta(message) {
  if (!state.answer || state.stopped) return;
  state.answer.text += message.text;
  state.answer.lastEvent = message.id;
  queueRender();
}

function onDone(message) {
  const answer = state.answer;
  if (answer) {
    answer.text = message.content;
    renderAnswer();
    answer.turn.classList.remove("streaming");
    answer.turn.dataset.status = message.status;
    if (message.status === "cancelled") setNote(answer.turn, "Stopped before the end.");
    else if (message.status === "error") setNote(answer.turn, message.error || "The answer failed.", true);
  }
  finishRequest();
}

function onError(message) {
  if (state.pendingQuestion) {
    // Nothing was stored: give the text back to the box so nothing is lost.
    if (!messageBox.value) messageBox.value = state.pendingQuestion.querySelector("article").textContent;
    state.pendingQuestion.remove();
    state.pendingQuestion = null;
    $("empty-hint").hidden = messagesEl.querySelector(".turn") !== null;
  }
  if (state.replacedAnswer) {
    messagesEl.append(state.replacedAnswer);
    state.replacedAnswer = null;
  }
  if (message.code === "insufficient_quota") showQuotaNotice(message.message);
  else showError(message.message);
  // A resume refused, or a failure the server did not expect: the answer is no longer followed.
  const ends = message.param === "request" || message.param === "last_event" || message.code === "server_error";
  if (state.answer && ends) {
    state.answer.turn.classList.remove("streaming");
    setNote(state.answer.turn, "This answer could not be followed: reload the page to see how it ended.", true);
  }
  if (!state.answer || ends) finishRequest();
}

// An answer still being written when the page loaded (a reload, a second tab): show it from its
// first event on and follow it to the end.
function resumeStreamingAnswer() {
  const turns = messagesEl.querySelectorAll(".turn-assistant[data-request-id]");
  const turn = turns[turns.length - 1];
  if (!turn || turn.dataset.status !== "streaming") return;
  turn.querySelector(".note")?.remove();
  turn.classList.add("streaming");
  const article = turn.querySelector("article");
  article.replaceChildren();
  state.answer = { turn, article, text: "", request: turn.dataset.requestId, lastEvent: "0" };
  state.streaming = true;
  send({ type: "resume", request: state.answer.request, last_event: "0" });
}

// The token budget is used up: the message stands where the answer would have been (not stored).
function showQuotaNotice(text) {
  const turn = document.createElement("div");
  turn.className = "turn turn-notice";
  turn.setAttribute("role", "alert");
  setNote(turn, text, true);
  $("empty-hint").hidden = true;
  messagesEl.append(turn);
  scrollDown();
}

function finishRequest() {
  state.streaming = false;
  state.stopped = false;
  state.answer = null;
  updateButtons();
}

function addRecent(conversation) {
  $("no-recent")?.remove();
  const list = $("recent");
  for (const link of list.querySelectorAll("a[aria-current]")) link.removeAttribute("aria-current");
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = conversation.url;
  link.textContent = conversation.title;
  link.setAttribute("aria-current", "page");
  item.append(link);
  list.prepend(item);
}

// --- the controls -----------------------------------------------------------------------------

function chatSettings() {
  const settings = { conversation: state.conversation, deployment: deploymentSelect.value };
  for (const field of document.querySelectorAll("#settings [data-chat-field]")) {
    const value = field.value.trim();
    if (field.hasAttribute("data-number")) settings[field.name] = value === "" ? null : Number(value);
    else settings[field.name] = field.value;
  }
  return settings;
}

function fillDefaults() {
  const values = defaults[deploymentSelect.value];
  if (!values) return;
  for (const [name, value] of Object.entries(values)) $(name).value = value;
  const option = deploymentSelect.selectedOptions[0];
  $("deployment-status").textContent = option ? option.dataset.status : "";
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = messageBox.value;
  if (state.streaming || !prompt.trim()) return;
  showError("");
  for (const notice of messagesEl.querySelectorAll(".turn-notice")) notice.remove();
  state.streaming = true;
  state.stopped = false;
  state.pendingQuestion = turnElement("user", prompt);
  messageBox.value = "";
  scrollDown();
  send({ type: "send", prompt, ...chatSettings() });
  updateButtons();
});

messageBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

stopButton.addEventListener("click", () => {
  if (!state.streaming || state.stopped) return;
  state.stopped = true;
  send({ type: "stop" });
  updateButtons();
});

regenerateButton.addEventListener("click", () => {
  const last = messagesEl.querySelector(".turn:last-of-type");
  if (state.streaming || !last || !last.classList.contains("turn-assistant")) return;
  showError("");
  last.remove();
  state.replacedAnswer = last;
  state.streaming = true;
  state.stopped = false;
  send({ type: "regenerate", ...chatSettings() });
  updateButtons();
});

deploymentSelect.addEventListener("change", fillDefaults);
$("use-defaults").addEventListener("click", fillDefaults);

// Stored answers arrive as plain text in the page; render them the same way as streamed ones.
for (const article of messagesEl.querySelectorAll('article[data-role="assistant"]')) {
  renderMarkdown(article, article.textContent);
}
resumeStreamingAnswer();
scrollDown();
updateButtons();
connect();
