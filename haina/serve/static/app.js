// haina playground: streams a chat from /v1/chat/completions (OpenAI server-sent events) with fetch.
// Plain browser JavaScript, no dependencies and no build step. Model text is only ever set through
// textContent, never innerHTML, so whatever the model writes stays text; so are retrieved sources.
// With a server started with --rag, a toggle sends haina_rag and a panel lists the last answer's sources.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"), apiKey: $("api-key"), system: $("system"), temperature: $("temperature"),
    temperatureValue: $("temperature-value"), topP: $("top-p"), topPValue: $("top-p-value"),
    maxTokens: $("max-tokens"), clear: $("clear"), stats: $("stats"), messages: $("messages"),
    composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
    ragToggle: $("rag-toggle"), useRag: $("use-rag"), ragName: $("rag-name"), sourcesPanel: $("sources-panel"),
    sourcesNote: $("sources-note"), sources: $("sources"),
  };
  const KEY_STORAGE = "haina.playground.apiKey";

  let history = [];        // the conversation sent with each request: [{role, content}], system prompt excluded
  let controller = null;   // AbortController of the request in flight; null when idle
  let epoch = 0;           // bumped by "clear", so that an answer still finishing does not land in the new chat
  let rag = null;          // the server's knowledge base (/v1/models' haina_rag), or null without --rag

  // ------------------------------------------------------------------ server-sent events
  // Splits a text stream into SSE events and hands each event's data to onData. Network reads end
  // anywhere (mid-line, mid-event, between "\r" and "\n"), so unfinished pieces wait for the next push.
  class SSEParser {
    constructor(onData) {
      this.onData = onData;
      this.partial = "";   // an unfinished line
      this.pendingCR = false;   // the read ended on "\r", which may be the first half of "\r\n"
      this.data = [];      // data lines of the event being read
    }

    push(text) {
      if (this.pendingCR) { text = "\r" + text; this.pendingCR = false; }
      if (text.endsWith("\r")) { this.pendingCR = true; text = text.slice(0, -1); }
      const lines = (this.partial + text).split(/\r\n|\r|\n/);
      this.partial = lines.pop();
      for (const line of lines) this.line(line);
    }

    end() {  // the stream closed: whatever is left counts as a finished event
      if (this.partial) this.line(this.partial);
      this.partial = "";
      this.line("");
    }

    line(line) {
      if (line === "") {  // a blank line ends the event
        if (this.data.length) {
          const data = this.data.join("\n");
          this.data = [];
          this.onData(data);
        }
        return;
      }
      if (line.startsWith(":")) return;  // a comment (servers send these as keep-alives)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);  // event/id/retry: the OpenAI stream does not use them
    }
  }

  // ------------------------------------------------------------------ errors
  class ApiError extends Error {}

  function describe(error) {  // {"message", "type", "param", "code"} -> one readable line
    if (!error || typeof error !== "object") return String(error);
    const kind = [error.type, error.code].filter((x) => x !== undefined && x !== null && x !== "").join(", ");
    const param = error.param ? ` [${error.param}]` : "";
    return `${kind ? kind + ": " : ""}${error.message || JSON.stringify(error)}${param}`;
  }

  async function responseError(response) {
    let body = "";
    try { body = await response.text(); } catch (_) { /* the body is a courtesy; the status says enough */ }
    let detail = body.slice(0, 500);
    try {
      const parsed = JSON.parse(body);
      if (parsed && parsed.error) detail = describe(parsed.error);
      else if (parsed && parsed.detail) detail = typeof parsed.detail === "string" ? parsed.detail : JSON.stringify(parsed.detail);
    } catch (_) { /* not JSON: show the text */ }
    return new ApiError(`HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}` +
                        (detail ? ` — ${detail}` : ""));
  }

  // ------------------------------------------------------------------ page helpers
  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.apiKey.value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function nearBottom() {
    const m = ui.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function addMessage(role, text, cls = role) {
    const follow = nearBottom();
    const div = document.createElement("div");
    div.className = `message ${cls}`;
    div.dataset.role = role;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    const content = document.createElement("span");
    content.className = "content";
    content.textContent = text;
    div.append(label, content);
    ui.messages.append(div);
    if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
    return div;
  }

  function setText(div, text) {
    const follow = nearBottom();
    div.querySelector(".content").textContent = text;
    if (follow) ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  function addNote(div, text) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = text;
    div.append(note);
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
  }

  // ------------------------------------------------------------------ sources
  function showSources(sources, note) {
    ui.sources.replaceChildren();
    ui.sourcesNote.textContent = note;
    for (const s of sources || []) {
      const li = document.createElement("li");
      li.className = "source";
      li.title = String(s.text ?? "");  // the whole passage on hover
      const head = document.createElement("div");
      head.className = "head";
      const n = document.createElement("span");
      n.className = "n";
      n.textContent = `[${s.n}]`;
      const path = document.createElement("span");
      path.className = "path";
      path.textContent = String(s.source ?? s.id ?? "");
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = typeof s.score === "number" ? s.score.toPrecision(3) : "";
      head.append(n, path, score);
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      summary.textContent = li.title.slice(0, 80);
      const text = document.createElement("p");
      text.className = "text";
      text.textContent = li.title;
      details.append(summary, text);
      li.append(head, details);
      ui.sources.append(li);
    }
  }

  function setRag(info) {
    rag = info && typeof info === "object" ? info : null;
    ui.ragToggle.hidden = ui.sourcesPanel.hidden = !rag;
    ui.ragName.textContent = rag && rag.collection ? `(${rag.collection})` : "";
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    ui.model.replaceChildren();
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) throw await responseError(response);
      const models = (await response.json()).data || [];
      for (const m of models) ui.model.append(new Option(m.id, m.id));
      setRag(models.length ? models[0].haina_rag : null);  // haina's extension: present with --rag
      const limit = models.length ? models[0].max_model_len : undefined;  // a vLLM extension; fine when absent
      if (Number.isInteger(limit)) ui.maxTokens.max = String(limit);
      if (!models.length) ui.stats.textContent = "the server lists no models";
      else if (ui.stats.dataset.kind === "models") ui.stats.textContent = "";
    } catch (e) {
      ui.model.append(new Option("(no model)", ""));
      ui.stats.textContent = `could not list models: ${e.message}`;
      ui.stats.dataset.kind = "models";
    }
  }

  // ------------------------------------------------------------------ chat
  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history);
    const body = {
      messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(ui.temperature.value), top_p: Number(ui.topP.value),
    };
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;  // empty: the server's default
    if (ui.model.value) body.model = ui.model.value;
    if (rag) body.haina_rag = ui.useRag.checked;
    return body;
  }

  function showStats({ tokens, counted, t0, tFirst, tEnd, finish }) {
    const total = (tEnd - t0) / 1000;
    // Decode speed: tokens after the first over the time after the first, as servers report it;
    // with one token (or all of them in one read) there is no such interval, so use the whole request.
    const decode = tFirst !== null ? (tEnd - tFirst) / 1000 : 0;
    const rate = tokens > 1 && decode > 0.001 ? (tokens - 1) / decode : tokens / Math.max(total, 1e-3);
    const parts = [
      `${tokens} tokens${counted ? " (counted)" : ""}`,
      `${rate.toFixed(1)} tokens/s`,
      `TTFT ${tFirst !== null ? Math.round(tFirst - t0) + " ms" : "–"}`,
      `${total.toFixed(2)} s total`,
    ];
    if (finish) parts.push(`finish: ${finish}`);
    ui.stats.textContent = parts.join(" · ");
    ui.stats.dataset.kind = "answer";
  }

  async function send() {
    const text = ui.prompt.value;
    if (!text.trim() || controller) return;
    controller = new AbortController();  // taken before any await, so a second Enter cannot send twice
    setBusy(true);
    ui.prompt.value = "";
    if (!ui.model.value) {  // the list failed earlier (say, before the API key was typed): try again
      await loadModels();
      if (controller.signal.aborted) {  // "clear" or "stop" meanwhile: send nothing
        controller = null;
        setBusy(false);
        ui.prompt.value = text;
        return;
      }
    }
    const userDiv = addMessage("user", text);
    history.push({ role: "user", content: text });
    const bubble = addMessage("assistant", "");
    bubble.classList.add("streaming");
    const body = requestBody();
    const started = epoch;
    const t0 = performance.now();
    let tFirst = null, deltas = 0, usage = null, finish = null, answer = "", stopped = false, error = null;
    let sourced = false;  // the answer came with sources (the first chunk carries them)
    if (rag) showSources([], body.haina_rag ? "searching the knowledge base…" : "knowledge base off for this answer");
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) throw await responseError(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();  // stream mode keeps a UTF-8 character split across reads whole
      let done = false;
      const parser = new SSEParser((data) => {
        if (data === "[DONE]") { done = true; return; }
        let chunk;
        try { chunk = JSON.parse(data); } catch (_) { throw new ApiError(`malformed event from the server: ${data.slice(0, 200)}`); }
        if (chunk.error) throw new ApiError(describe(chunk.error));
        if (chunk.usage) usage = chunk.usage;
        if (Array.isArray(chunk.sources) && started === epoch) {
          sourced = true;
          const n = chunk.sources.length;
          showSources(chunk.sources, n ? `${n} source${n > 1 ? "s" : ""} for the last answer` :
            "nothing in the knowledge base matched; the model was told so");
        }
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            deltas += 1;
            answer += piece;
            setText(bubble, answer);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      });
      while (!done) {
        const { value, done: closed } = await reader.read();
        if (closed) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
      if (done) reader.cancel().catch(() => {});
      else { parser.push(decoder.decode()); parser.end(); }
      if (!done) throw new ApiError("the stream ended before [DONE]");
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else error = e;
    } finally {
      const tEnd = performance.now();
      if (error) controller.abort();  // an error mid-stream: hang up, so the server stops generating
      controller = null;
      setBusy(false);
      bubble.classList.remove("streaming");
      if (rag && !sourced && started === epoch && body.haina_rag) showSources([], "no sources came with this answer");
      if (started === epoch) {  // else "clear" was pressed meanwhile: the conversation this answer belonged to is gone
        if (answer || !error) {
          history.push({ role: "assistant", content: answer });
          if (stopped) addNote(bubble, "stopped");
          else if (!answer) addNote(bubble, "(the model returned no text)");
          const tokens = usage && Number.isInteger(usage.completion_tokens) ? usage.completion_tokens : deltas;
          showStats({ tokens, counted: !usage, t0, tFirst, tEnd, finish: stopped ? "stopped" : finish });
        } else {  // nothing was said: drop the turn, and give the text back to edit and resend
          bubble.remove();
          history.pop();
          userDiv.classList.add("failed");
          if (!ui.prompt.value) ui.prompt.value = text;
        }
        if (error) addMessage("error", error.message || String(error));
      }
      ui.prompt.focus();
    }
  }

  // ------------------------------------------------------------------ wiring
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
  ui.prompt.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a newline; never while an input method is composing a character.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  ui.stop.addEventListener("click", () => { if (controller) controller.abort(); });
  ui.clear.addEventListener("click", () => {
    if (controller) controller.abort();
    epoch += 1;
    history = [];
    ui.messages.replaceChildren();
    ui.stats.textContent = "";
    showSources([], "the sources of the last answer appear here");
    ui.prompt.focus();
  });
  const mirror = (input, output) => {
    const show = () => { output.textContent = input.value; };
    input.addEventListener("input", show);
    show();
  };
  mirror(ui.temperature, ui.temperatureValue);
  mirror(ui.topP, ui.topPValue);
  ui.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  const saveKey = () => {
    const key = ui.apiKey.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadModels();
  };
  ui.apiKey.addEventListener("change", saveKey);
  $("connection").addEventListener("submit", (e) => { e.preventDefault(); saveKey(); });  // Enter in the key field

  loadModels();
  ui.prompt.focus();
})();
