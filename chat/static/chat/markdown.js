// Safe Markdown: model output and document text are shown, never run.
// Raw HTML in the source is shown as text, links only to http(s)/mailto, no images; DOMPurify then
// sanitises what marked produced (a second lock), and highlight.js colours code blocks.
import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const SAFE_URL = /^(?:https?:|mailto:)/i;

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html(token) {
      return escapeHtml(token.text);
    },
    link(token) {
      return SAFE_URL.test(token.href) ? false : escapeHtml(token.raw);
    },
    image(token) {
      return escapeHtml(token.raw);
    },
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  ALLOWED_URI_REGEXP: SAFE_URL,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["style", "id", "name"],
};

hljs.configure({ ignoreUnescapedHTML: true });

export function renderMarkdown(element, source) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(source || ""), PURIFY);
  for (const code of element.querySelectorAll("pre code")) {
    const known = [...code.classList].some((c) => c.startsWith("language-") && hljs.getLanguage(c.slice(9)));
    if (known) hljs.highlightElement(code);
  }
}
