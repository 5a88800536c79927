// thumbtune chat page: plain JavaScript, no build step, no network beyond this server.
// Talks to the OpenAI-compatible API: POST /v1/chat/completions (streamed, SSE) and POST /v1/feedback.
"use strict";

(() => {
  const CHAT_URL = "/v1/chat/completions";
  const FEEDBACK_URL = "/v1/feedback";
  const ADAPTER_HEADER = "x-thumbtune-adapter-version";
  const KEY_STORE = "thumbtune.apiKey";
  const SETTINGS_STORE = "thumbtune.sampling";
  const BROWSER_STORE = "thumbtune.browserId";
  // What a user of a small chat model wants by default: varied but on topic, and short enough to read
  // (SmolLM2-135M at the server's own defaults, T = 1 and 256 tokens, rambles for ~13 s per answer).
  const DEFAULTS = { temperature: 0.7, top_p: 0.9, max_tokens: 128 };
  const LABELS = ["A", "B", "C", "D"];

  const $ = (id) => document.getElementById(id);
  const log = $("log");
  const main = $("main");
  const empty = $("empty");
  const composer = $("composer");
  const prompt = $("prompt");
  const sendButton = $("send");
  const compare = $("compare");
  const compareN = $("compare-n");
  const fields = { temperature: $("temperature"), top_p: $("top-p"), max_tokens: $("max-tokens") };
  const keyForm = $("key-form");
  const keyInput = $("api-key");
  const keyHelp = $("key-help");
  const forgetKey = $("forget-key");

  // The conversation sent as context: [{role, content}]. An assistant entry of a compare turn is
  // replaced by the answer the user picks.
  let history = [];
  let busy = false;
  let controller = null; // aborts the answer being streamed (New chat)
  let afterKey = null; // what to retry once an API key is saved
  let uid = 0;

  // --- small helpers -------------------------------------------------------------------------------

  function h(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === false || value === null || value === undefined) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const ICONS = {
    up: "M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3",
    down: "M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17",
  };

  function icon(name) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("class", "icon");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", ICONS[name]);
    svg.append(path);
    return svg;
  }

  function nearBottom() {
    return main.scrollHeight - main.scrollTop - main.clientHeight < 120;
  }

  function scrollDown(force = false) {
    if (force || nearBottom()) main.scrollTop = main.scrollHeight;
  }

  function apiKey() {
    try {
      return localStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";
    }
  }

  // The request's `user`: this browser's id, kept across visits, so a canary version serves this browser
  // consistently (the server assigns canaries per user, then per API key).
  function browserId() {
    try {
      let id = localStorage.getItem(BROWSER_STORE);
      if (!id) {
        id = `browser-${crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)}`;
        localStorage.setItem(BROWSER_STORE, id);
      }
      return id;
    } catch {
      return undefined;
    }
  }

  function showKeyState() {
    forgetKey.hidden = !apiKey();
  }

  // --- HTTP ----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, code = null, retryAfter = null) {
      super(message);
      this.status = status; // 0: the server could not be reached
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  async function post(url, body, signal) {
    const headers = { "content-type": "application/json" };
    const key = apiKey();
    if (key) headers.authorization = `Bearer ${key}`;
    let resp;
    try {
      resp = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), signal });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, String(err && err.message), "network");
    }
    if (!resp.ok) {
      let message = resp.statusText;
      let code = null;
      try {
        const data = await resp.json();
        if (data && data.error) ({ message, code } = data.error);
      } catch {
        /* not JSON: keep the status text */
      }
      const retry = Number.parseInt(resp.headers.get("retry-after") || "", 10);
      throw new ApiError(resp.status, message, code, Number.isFinite(retry) ? retry : null);
    }
    return resp;
  }

  function wait(seconds) {
    if (!seconds) return "Please wait a moment and try again.";
    if (seconds < 90) return `Please try again in ${seconds} second${seconds === 1 ? "" : "s"}.`;
    return `Please try again in about ${Math.round(seconds / 60)} minutes.`;
  }

  // Words a user understands, for an error while chatting ("chat") or rating ("rate").
  function friendly(err, what) {
    if (err.status === 0) {
      return "Can't reach the server. Check that it is running and your connection works, then try again.";
    }
    switch (err.status) {
      case 401:
        return apiKey() ? "That API key was not accepted. Enter a valid key." : "This server needs an API key.";
      case 404:
        if (what === "rate") {
          return "This answer can no longer be rated: it expired, or the server restarted since it was given.";
        }
        return `The server could not find what was asked for: ${err.message}`;
      case 409:
        return "This answer was already rated, and a rating is final.";
      case 413:
        return "That message is too long for the server. Shorten it and try again.";
      case 429:
        return `Too many requests right now. ${wait(err.retryAfter)}`;
      case 503:
        return what === "rate"
          ? `The server can't take ratings right now. ${wait(err.retryAfter)}`
          : `The server is busy or not ready. ${wait(err.retryAfter)}`;
      case 400:
        if (err.code === "context_length_exceeded") {
          return "This conversation is now too long for the model. Start a new chat to go on.";
        }
        return `The server refused the request: ${err.message}`;
      default:
        if (err.status >= 500) return "Something went wrong on the server. Try again in a moment.";
        return `The request failed (${err.status}): ${err.message}`;
    }
  }

  // --- API key -------------------------------------------------------------------------------------

  function askForKey(err, retry) {
    afterKey = retry;
    keyHelp.textContent = apiKey()
      ? "That API key was not accepted. Enter a valid key; it stays in this browser only."
      : "This server needs an API key. It stays in this browser only.";
    keyForm.hidden = false;
    keyInput.value = "";
    keyInput.focus();
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return;
    try {
      localStorage.setItem(KEY_STORE, key);
    } catch {
      /* storage refused (private mode): the key is lost at reload */
    }
    keyForm.hidden = true;
    showKeyState();
    const retry = afterKey;
    afterKey = null;
    prompt.focus();
    if (retry) retry();
  });

  forgetKey.addEventListener("click", () => {
    try {
      localStorage.removeItem(KEY_STORE);
    } catch {
      /* nothing stored */
    }
    showKeyState();
    prompt.focus();
  });

  // --- answers -------------------------------------------------------------------------------------

  function badge(adapter) {
    return h("span", { class: "badge badge-adapter", title: "The adapter version that produced this answer" },
      h("span", { class: "visually-hidden", text: "Adapter version " }),
      h("span", { "aria-hidden": "true", text: "adapter " }),
      h("span", { class: "badge-version", text: adapter || "?" }));
  }

  // One answer card; `label` is "A" to "D" in compare mode, null for a single answer.
  function answerCard(label) {
    const body = h("div", { class: "msg-body", "aria-busy": "true" },
      h("span", { class: "typing", role: "img", "aria-label": "Writing an answer" }, h("i"), h("i"), h("i")));
    const meta = h("div", { class: "msg-meta" });
    const el = h("article", {
      class: "msg msg-assistant", "aria-label": label ? `Answer ${label}` : "Answer", "data-state": "streaming",
      "data-chunks": "0",
    }, label ? h("h3", { class: "answer-label", text: `Answer ${label}` }) : null, body, meta);
    const card = {
      el, body, meta, label, text: "", responseId: null, adapter: null, chunks: 0, finishReason: null,
      append(piece) {
        if (!card.text) body.textContent = "";
        card.text += piece;
        card.chunks += 1;
        el.dataset.chunks = String(card.chunks);
        body.textContent = card.text;
        scrollDown();
      },
      finish(adapter) {
        card.adapter = adapter;
        body.setAttribute("aria-busy", "false");
        el.dataset.state = "done";
        el.dataset.adapter = adapter || "";
        if (!card.text.trim()) {
          body.textContent = "";
          body.append(h("em", { class: "muted", text: "(empty answer)" }));
        }
        meta.prepend(badge(adapter));
        if (card.finishReason === "length") {
          meta.append(h("span", { class: "badge badge-muted", text: "cut short",
            title: "The answer reached its length limit" }));
        }
      },
      fail() {
        body.setAttribute("aria-busy", "false");
        el.dataset.state = "error";
        if (!card.text) body.remove();
      },
    };
    return card;
  }

  // Thumbs, an optional 1-5 rating and a comment, for a single answer.
  function feedbackBar(card) {
    const n = ++uid;
    const status = h("p", { class: "fb-status", role: "status" });
    const comment = h("textarea", { id: `comment-${n}`, rows: "2", maxlength: "2000",
      placeholder: "What was good or bad?" });
    const stars = [1, 2, 3, 4, 5].map((r) => {
      const id = `rating-${n}-${r}`;
      return h("span", { class: "star" },
        h("input", { type: "radio", name: `rating-${n}`, id, value: String(r) }),
        h("label", { for: id, title: ["", "Poor", "Weak", "OK", "Good", "Great"][r] }, String(r)));
    });
    const panel = h("form", { class: "rate-panel", id: `rate-${n}`, hidden: true },
      h("fieldset", { class: "stars" },
        h("legend", { text: "How good was this answer? 1 is poor, 5 is great." }), ...stars),
      h("label", { for: `comment-${n}`, class: "comment-label", text: "Comment (optional, sent with your rating or thumb)" }),
      comment,
      h("button", { type: "submit", class: "btn btn-primary btn-small", text: "Send rating" }));
    const up = h("button", { type: "button", class: "thumb thumb-up", "aria-pressed": "false",
      "aria-label": "Good answer", title: "Good answer" }, icon("up"));
    const down = h("button", { type: "button", class: "thumb thumb-down", "aria-pressed": "false",
      "aria-label": "Bad answer", title: "Bad answer" }, icon("down"));
    const more = h("button", { type: "button", class: "btn btn-ghost btn-small", "aria-expanded": "false",
      "aria-controls": panel.id, text: "Rate 1–5…" });
    const controls = [up, down, more, ...panel.querySelectorAll("input, textarea, button")];
    const bar = h("div", { class: "feedback", role: "group", "aria-label": "Rate this answer" }, up, down, more);

    function setBusy(on) {
      for (const c of controls) c.disabled = on;
    }

    async function send(payload, done) {
      const text = comment.value.trim();
      if (text) payload.comment = text;
      setBusy(true);
      status.className = "fb-status";
      status.textContent = "Sending…";
      try {
        await post(FEEDBACK_URL, { response_id: card.responseId, ...payload });
        done();
        status.textContent = `Thanks! ${payload.thumb ? `You rated this answer ${payload.thumb === "up" ? "good" : "bad"}` : `You rated this answer ${payload.rating} out of 5`}${text ? ", with a comment" : ""}.`;
        card.el.dataset.rated = payload.thumb || String(payload.rating);
        panel.hidden = true;
        more.setAttribute("aria-expanded", "false");
        for (const c of controls) c.disabled = true;
      } catch (err) {
        setBusy(false);
        if (err.status === 401) {
          status.textContent = "";
          askForKey(err, () => send(payload, done));
          return;
        }
        status.className = "fb-status error";
        status.textContent = friendly(err, "rate");
        if (err.status === 404 || err.status === 409) for (const c of controls) c.disabled = true;
      }
    }

    up.addEventListener("click", () => send({ thumb: "up" }, () => up.setAttribute("aria-pressed", "true")));
    down.addEventListener("click", () => send({ thumb: "down" }, () => down.setAttribute("aria-pressed", "true")));
    more.addEventListener("click", () => {
      panel.hidden = !panel.hidden;
      more.setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) panel.querySelector("input").focus();
    });
    panel.addEventListener("submit", (event) => {
      event.preventDefault();
      const picked = panel.querySelector("input[type=radio]:checked");
      if (!picked) {
        status.className = "fb-status error";
        status.textContent = "Pick a rating from 1 to 5 first.";
        panel.querySelector("input").focus();
        return;
      }
      send({ rating: Number(picked.value) }, () => panel.classList.add("sent"));
    });
    return h("div", { class: "feedback-wrap" }, bar, panel, status);
  }

  // --- answer settings (sent with every request; kept in this browser) -------------------------------

  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}") || {};
    } catch {
      saved = {};
    }
    for (const [name, input] of Object.entries(fields)) {
      input.value = String(name in saved ? saved[name] : DEFAULTS[name]);
    }
  }

  // The settings as numbers; an empty or out-of-range field counts as its default (and is marked invalid).
  function sampling() {
    const values = {};
    for (const [name, input] of Object.entries(fields)) {
      const value = Number(input.value);
      values[name] = input.value !== "" && input.checkValidity() && Number.isFinite(value) ? value : DEFAULTS[name];
    }
    return values;
  }

  function saveSettings() {
    try {
      localStorage.setItem(SETTINGS_STORE, JSON.stringify(sampling()));
    } catch {
      /* storage refused: the settings last until reload */
    }
  }

  for (const input of Object.values(fields)) input.addEventListener("change", saveSettings);
  $("reset-settings").addEventListener("click", () => {
    try {
      localStorage.removeItem(SETTINGS_STORE);
    } catch {
      /* nothing stored */
    }
    loadSettings();
  });

  const compareUI = window.thumbtuneCompare({ h, icon, post, friendly, askForKey, FEEDBACK_URL });
  compare.addEventListener("change", () => {
    compareN.disabled = !compare.checked;
  });

  // --- streaming -----------------------------------------------------------------------------------

  // Reads the SSE stream of OpenAI chunks; calls onChoice(choice) for every choice of every chunk.
  async function readStream(resp, onChoice) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(503, chunk.error.message, chunk.error.code);
        for (const choice of chunk.choices || []) onChoice(choice);
      }
    }
    throw new ApiError(0, "the answer stopped before it was complete", "truncated");
  }

  function setBusy(on) {
    busy = on;
    sendButton.disabled = on;
    sendButton.textContent = on ? "Answering…" : "Send";
    composer.setAttribute("aria-busy", String(on));
  }

  function userBubble(text) {
    return h("li", { class: "turn turn-user" },
      h("div", { class: "msg msg-user" },
        h("span", { class: "visually-hidden", text: "You said: " }),
        h("span", { class: "msg-body", text })));
  }

  async function sendMessage(text) {
    if (busy || !text.trim()) return;
    empty.hidden = true;
    const n = compare.checked ? Number(compareN.value) : 1;
    const userItem = userBubble(text);
    log.append(userItem);
    const cards = Array.from({ length: n }, (_, i) => answerCard(n > 1 ? LABELS[i] : null));
    const turn = n > 1
      ? h("li", { class: "turn turn-compare", "data-compare": "true" },
        h("p", { class: "compare-title", text: compareUI.title(n) }),
        h("div", { class: "compare-grid" }, ...cards.map((c) => c.el)))
      : h("li", { class: "turn turn-assistant" }, cards[0].el);
    log.append(turn);
    scrollDown(true);

    const messages = [...history, { role: "user", content: text }];
    setBusy(true);
    controller = new AbortController();
    const mine = controller;
    try {
      const body = { model: "thumbtune", messages, stream: true, n, user: browserId(), ...sampling() };
      const resp = await post(CHAT_URL, body, mine.signal);
      const adapter = resp.headers.get(ADAPTER_HEADER);
      await readStream(resp, (choice) => {
        const card = cards[choice.index];
        if (!card) return;
        card.responseId = choice.response_id || card.responseId;
        card.el.dataset.responseId = card.responseId;
        const piece = choice.delta && choice.delta.content;
        if (piece) card.append(piece);
        if (choice.finish_reason) card.finishReason = choice.finish_reason;
      });
      for (const card of cards) card.finish(adapter);
      const entry = { role: "assistant", content: cards[0].text };
      history = [...messages, entry];
      if (n > 1) {
        turn.append(compareUI.compareBar(turn, cards, entry));
      } else {
        cards[0].el.append(feedbackBar(cards[0]));
      }
    } catch (err) {
      if (err.name === "AbortError" || mine.signal.aborted) return; // New chat: the turn is gone anyway
      for (const card of cards) card.fail();
      if (!cards.some((c) => c.text)) turn.remove();
      userItem.classList.add("failed");
      if (err.status === 401) {
        turn.remove(); // the message stays in view (dimmed) until a key is saved and it is sent again
        askForKey(err, () => {
          userItem.remove();
          sendMessage(text);
        });
        return;
      }
      const retry = h("button", { type: "button", class: "btn btn-ghost btn-small", text: "Try again" });
      const note = h("li", { class: "turn turn-error" },
        h("div", { class: "error-box", role: "alert" }, h("p", { text: friendly(err, "chat") }), retry));
      retry.addEventListener("click", () => {
        note.remove();
        userItem.remove();
        turn.remove();
        sendMessage(text);
        prompt.focus();
      });
      log.append(note);
      scrollDown(true);
    } finally {
      if (controller === mine) {
        controller = null;
        setBusy(false);
      }
    }
  }

  // --- composer ------------------------------------------------------------------------------------

  function grow() {
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, 200)}px`;
  }

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value;
    if (busy || !text.trim()) return;
    prompt.value = "";
    grow();
    sendMessage(text);
  });

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  prompt.addEventListener("input", grow);

  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    controller = null;
    setBusy(false);
    history = [];
    log.replaceChildren();
    empty.hidden = false;
    prompt.value = "";
    grow();
    prompt.focus();
  });

  showKeyState();
  loadSettings();
  compareN.disabled = !compare.checked;
  document.documentElement.dataset.ready = "true";
})();
