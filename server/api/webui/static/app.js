// Loom playground: chat (streamed over SSE, optionally held to a JSON schema), summarize, classify, embeddings and
// rerank (when the server has an encoder), and a status strip, on the server's own API.
// Plain JavaScript, no dependencies. Model and user text only ever reach the page as text nodes (textContent,
// append(string)): nothing is parsed as HTML, so no answer can inject markup or script.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'role') node.setAttribute(k, v);
      else node[k] = v;
    }
    node.append(...children);
    return node;
  };

  // ---- safe Markdown: a small subset, built as DOM nodes ----------------------------------------------------------
  // Fenced code blocks, headings, bullet and numbered lists, paragraphs; inline code, bold, italics, and links whose
  // URL is http(s). Anything else stays literal text.
  const INLINE = /(`+)([\s\S]+?)\1|\*\*(?=\S)([\s\S]+?)\*\*|(?<![\w])__(?=\S)([\s\S]+?)__(?![\w])|\*(?=[^\s*])([^*]+?)\*|(?<![\w])_(?=[^\s_])([^_]+?)_(?![\w])|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

  function safeHref(url) {
    try {
      const u = new URL(url);
      return (u.protocol === 'http:' || u.protocol === 'https:') ? u.href : null;
    } catch (e) {
      return null;
    }
  }

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      parent.append(text.slice(last, m.index));
      last = m.index + m[0].length;
      if (m[1]) parent.append(el('code', { text: m[2] }));
      else if (m[3] || m[4]) inline(m[3] || m[4], parent.appendChild(el('strong')));
      else if (m[5] || m[6]) inline(m[5] || m[6], parent.appendChild(el('em')));
      else {
        const href = safeHref(m[8]);
        if (href) parent.append(el('a', { href, text: m[7], target: '_blank', rel: 'noopener noreferrer nofollow' }));
        else parent.append(m[0]);
      }
    }
    parent.append(text.slice(last));
    return parent;
  }

  const FENCE = /^\s{0,3}(`{3,}|~{3,})\s*([\w+#.-]*)\s*$/;
  const BULLET = /^\s{0,3}[-*+]\s+(.*)$/;
  const NUMBERED = /^\s{0,3}\d{1,9}[.)]\s+(.*)$/;
  const HEADING = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const MARKER = /^\s{0,3}(?:[-*+]|\d{1,9}[.)])\s*$/;

  function renderMarkdown(src, root) {
    root.replaceChildren();
    const lines = String(src).replace(/\r\n?/g, '\n').split('\n');
    let i = 0;
    const special = (line) => [FENCE, BULLET, NUMBERED, HEADING, MARKER].some((re) => re.test(line));
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(FENCE);
      if (fence) {
        const body = [];
        for (i++; i < lines.length && !(lines[i].trim().startsWith(fence[1]) && FENCE.test(lines[i])); i++) {
          body.push(lines[i]);
        }
        i++;
        const code = el('code', { text: body.join('\n') });
        if (fence[2]) code.setAttribute('data-lang', fence[2]);
        root.append(el('pre', {}, code));
        continue;
      }
      if (!line.trim()) { i++; continue; }
      const heading = line.match(HEADING);
      if (heading) {
        root.append(inline(heading[2], el(`h${Math.min(6, heading[1].length + 2)}`)));
        i++;
        continue;
      }
      const kind = BULLET.test(line) ? BULLET : NUMBERED.test(line) ? NUMBERED : null;
      if (kind) {
        const list = el(kind === BULLET ? 'ul' : 'ol');
        for (; i < lines.length && kind.test(lines[i]); i++) {
          list.append(inline(lines[i].match(kind)[1], el('li')));
        }
        root.append(list);
        continue;
      }
      if (MARKER.test(line)) { // a list marker with nothing after it (yet): skip
        i++;
        continue;
      }
      const para = [];
      for (; i < lines.length && lines[i].trim() && (!para.length || !special(lines[i])); i++) para.push(lines[i]);
      root.append(inline(para.join('\n'), el('p')));
    }
    return root;
  }

  // ---- API: bearer key, errors, SSE -------------------------------------------------------------------------------
  const KEY = 'loom-api-key';
  let apiKey = sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || '';

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function headers() {
    const h = { 'Content-Type': 'application/json' };
    if (apiKey) h.Authorization = `Bearer ${apiKey}`;
    return h;
  }

  async function errorOf(response) {
    let message = `${response.status} ${response.statusText}`;
    let code;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code;
      }
    } catch (e) { /* not JSON: keep the status line */ }
    return new ApiError(response.status, message, code);
  }

  async function call(path, body, signal) {
    const response = await fetch(path, { method: 'POST', headers: headers(), body: JSON.stringify(body), signal });
    if (!response.ok) {
      const error = await errorOf(response);
      if (response.status === 401) askForKey(error.message, true);
      throw error;
    }
    return response;
  }

  // The JSON events of an SSE response (`data: {...}` blocks), up to `data: [DONE]`; an error event throws.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:'))
            .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
          if (!data) continue; // a comment (keep-alive ping) or an empty event
          if (data === '[DONE]') return;
          const event = JSON.parse(data);
          if (event.error) throw new ApiError(0, event.error.message || 'stream error', event.error.code);
          yield event;
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  const describe = (e) => (e instanceof ApiError && e.status ? `${e.status}: ${e.message}` : e.message || String(e));
  const errorNote = (e) => el('p', { class: 'error', role: 'alert', 'data-testid': 'error-message', text: describe(e) });
  const fmt = (x, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : '–');

  // ---- API key dialog ---------------------------------------------------------------------------------------------
  const dialog = $('key-dialog');
  let keyDismissed = false;

  // Opens the dialog: at once when a request was refused (`now`), on the status poll's 401 only until dismissed.
  function askForKey(reason, now) {
    $('key-error').textContent = apiKey ? reason : '';
    $('key-button').classList.add('attention');
    if (!dialog.open && (now || !keyDismissed)) {
      $('key-input').value = apiKey;
      dialog.showModal();
    }
  }

  $('key-button').addEventListener('click', () => askForKey('', true));
  $('key-cancel').addEventListener('click', () => { keyDismissed = true; dialog.close(); });
  dialog.addEventListener('cancel', () => { keyDismissed = true; });
  $('key-forget').addEventListener('click', () => {
    apiKey = '';
    sessionStorage.removeItem(KEY);
    localStorage.removeItem(KEY);
    $('key-input').value = '';
    dialog.close();
    pollStatus();
  });
  $('key-form').addEventListener('submit', () => { // method=dialog: the form closes the dialog itself
    apiKey = $('key-input').value.trim();
    sessionStorage.setItem(KEY, apiKey);
    if ($('key-remember').checked) localStorage.setItem(KEY, apiKey);
    else localStorage.removeItem(KEY);
    keyDismissed = false;
    pollStatus();
  });

  // ---- status strip -----------------------------------------------------------------------------------------------
  let lastTokens = null;
  let statusTimer = null;

  function showStatus(state, model) {
    $('status-dot').dataset.state = state;
    $('status-model').textContent = model;
  }

  async function pollStatus() {
    clearTimeout(statusTimer);
    try {
      const response = await fetch('v1/status', { headers: headers(), cache: 'no-store' });
      if (response.status === 401) {
        showStatus('locked', 'API key needed');
        askForKey((await errorOf(response)).message, false);
      } else if (!response.ok) {
        showStatus('error', `status ${response.status}`);
      } else {
        const s = await response.json();
        $('key-button').classList.remove('attention');
        showStatus(s.ready ? 'ready' : 'loading', s.model ? s.model : (s.reason || 'loading'));
        if (!s.ready && s.model) $('status-model').textContent = `${s.model} (${s.reason})`;
        $('status-ctx').textContent = s.max_model_len ? s.max_model_len.toLocaleString('en-US') : '–';
        const kv = Math.round((s.kv_cache_usage || 0) * 1000) / 10;
        $('status-kv').textContent = `${kv}%`;
        $('status-kv-fill').style.width = `${Math.min(100, kv)}%`;
        showEncoder(s.embedding_model || null);
        $('status-running').textContent = s.running;
        $('status-waiting').textContent = s.waiting;
        const now = performance.now();
        if (lastTokens) {
          const rate = (s.generation_tokens - lastTokens.n) / ((now - lastTokens.t) / 1000);
          $('status-speed').textContent = rate >= 0 ? fmt(rate) : '–';
        }
        lastTokens = { n: s.generation_tokens, t: now };
      }
    } catch (e) {
      showStatus('error', 'server unreachable');
    }
    clearTimeout(statusTimer); // two polls may overlap (a key was just saved): one timer goes on
    statusTimer = setTimeout(pollStatus, document.hidden ? 10000 : 2000);
  }

  // ---- tabs -------------------------------------------------------------------------------------------------------
  const tabs = [...document.querySelectorAll('[role=tab]')];

  function selectTab(tab) {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute('aria-selected', String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute('aria-controls')).hidden = !on;
    }
  }

  tabs.forEach((tab) => {
    tab.addEventListener('click', () => selectTab(tab));
    tab.addEventListener('keydown', (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const shown = tabs.filter((t) => !t.hidden); // a hidden tab (no encoder) is skipped
      const next = shown[(shown.indexOf(tab) + step + shown.length) % shown.length];
      selectTab(next);
      next.focus();
    });
  });

  // The Embeddings tab exists only while the server has an embedding model (`--embedding-model`).
  function showEncoder(name) {
    const tab = $('tab-embeddings');
    $('status-encoder-stat').hidden = !name;
    $('status-encoder').textContent = name || '';
    if (!name && tab.getAttribute('aria-selected') === 'true') selectTab($('tab-chat'));
    tab.hidden = !name;
  }

  // ---- chat -------------------------------------------------------------------------------------------------------
  const history = []; // {role, content} of the finished turns; each entry's view is in `views`
  const views = [];
  let chatAbort = null;

  function number(id, parse = Number) {
    const raw = $(id).value.trim();
    if (raw === '') return undefined;
    const value = parse(raw);
    return Number.isFinite(value) ? value : undefined;
  }

  function samplingParams() {
    const stop = $('stop').value.split(',').map((s) => s.replace(/\\n/g, '\n').replace(/\\t/g, '\t'))
      .filter((s) => s.length);
    const params = {
      temperature: number('temperature'), top_p: number('top-p'),
      max_tokens: number('max-tokens', (v) => parseInt(v, 10)), seed: number('seed', (v) => parseInt(v, 10)),
      stop: stop.length ? stop : undefined,
    };
    return Object.fromEntries(Object.entries(params).filter(([, v]) => v !== undefined));
  }

  // The JSON-schema box: {schema} (undefined when empty) or {problem}, why it holds no schema.
  function schemaBox() {
    const raw = $('schema-input').value.trim();
    if (!raw) return {};
    try {
      const schema = JSON.parse(raw);
      const object = schema !== null && typeof schema === 'object' && !Array.isArray(schema);
      return object ? { schema } : { problem: 'A JSON schema is an object: { "type": … }.' };
    } catch (e) {
      return { problem: `Not valid JSON: ${e.message}` };
    }
  }

  function showSchemaState({ schema, problem = '' }) {
    $('schema-error').textContent = problem;
    $('schema-input').setAttribute('aria-invalid', String(!!problem));
    $('schema-on').hidden = !schema;
  }

  // The request's `response_format`: undefined without a schema; null when the box holds no valid one (it then says
  // why, opened and focused, and nothing is sent).
  function responseFormat() {
    const box = schemaBox();
    showSchemaState(box);
    if (box.problem) {
      $('chat-settings').open = $('schema-details').open = true;
      $('schema-input').focus();
      return null;
    }
    return box.schema && { type: 'json_schema', json_schema: { name: 'playground', schema: box.schema, strict: true } };
  }

  // A schema-held answer: its text in a code block, indented once it parses (the history keeps the model's text).
  function renderJson(text, root) {
    let shown = text;
    try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* still streaming: as it came */ }
    root.replaceChildren(el('pre', {}, el('code', { 'data-lang': 'json', text: shown })));
    return root;
  }

  function addMessage(role) {
    $('chat-empty').hidden = true;
    const body = el('div', { class: 'body' });
    const meta = el('div', { class: 'meta' });
    const node = el('article', { class: `message ${role}`, 'aria-label': role === 'user' ? 'You' : 'Model' },
      el('div', { class: 'who', text: role === 'user' ? 'You' : 'Model' }), body, meta);
    if (role === 'assistant') {
      node.setAttribute('data-testid', 'assistant-message');
      body.setAttribute('data-testid', 'assistant-text');
      body.classList.add('markdown');
      meta.setAttribute('data-testid', 'answer-stats');
    } else {
      node.setAttribute('data-testid', 'user-message');
    }
    $('messages').append(node);
    scrollDown();
    return { node, body, meta };
  }

  function scrollDown() {
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
  }

  function setBusy(busy) {
    $('send-button').disabled = busy;
    $('regenerate-button').disabled = busy || !history.some((m) => m.role === 'user');
    $('clear-button').disabled = busy;
    $('stop-button').hidden = !busy;
  }

  function showError(view, error) {
    view.node.classList.add('failed');
    view.meta.before(errorNote(error));
  }

  async function answer(format) {
    const system = $('system-prompt').value.trim();
    const messages = [...(system ? [{ role: 'system', content: system }] : []), ...history];
    const view = addMessage('assistant');
    view.node.classList.add('streaming');
    const controller = chatAbort = new AbortController();
    setBusy(true);
    const t0 = performance.now();
    let first = null, text = '', usage = null, finish = null, frame = 0;
    const render = format ? renderJson : renderMarkdown;
    const paint = () => { frame = 0; render(text, view.body); scrollDown(); };
    try {
      const response = await call('v1/chat/completions', {
        messages, stream: true, stream_options: { include_usage: true }, ...samplingParams(),
        response_format: format, // undefined (no schema): JSON.stringify leaves it out
      }, controller.signal);
      for await (const event of sseEvents(response)) {
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            if (first === null) first = performance.now();
            text += delta;
            frame = frame || requestAnimationFrame(paint);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (e) {
      if (e.name === 'AbortError') finish = 'stopped';
      else showError(view, e);
    } finally {
      if (frame) cancelAnimationFrame(frame);
      paint();
      const end = performance.now();
      chatAbort = null;
      view.node.classList.remove('streaming');
      if (text || finish) {
        history.push({ role: 'assistant', content: text });
        views.push(view);
      }
      const parts = [];
      if (first !== null) parts.push(`TTFT ${Math.round(first - t0)} ms`);
      if (usage) {
        const n = usage.completion_tokens;
        if (n > 1 && first !== null && end > first) parts.push(`${fmt((n - 1) / ((end - first) / 1000))} tok/s`);
        parts.push(`${usage.prompt_tokens} prompt + ${n} completion tokens`);
      }
      if (finish) parts.push(finish === 'length' ? 'stopped at max tokens' : finish);
      if (format && text) parts.push('JSON schema');
      view.meta.textContent = parts.join(' · ');
      setBusy(false);
      scrollDown();
    }
  }

  function send() {
    const text = $('prompt').value;
    if (!text.trim() || chatAbort) return;
    const format = responseFormat();
    if (format === null) return;
    $('prompt').value = '';
    const view = addMessage('user');
    view.body.textContent = text; // the user's words, as typed: text, never markup
    history.push({ role: 'user', content: text });
    views.push(view);
    answer(format);
  }

  $('chat-form').addEventListener('submit', (e) => { e.preventDefault(); send(); });
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $('stop-button').addEventListener('click', () => chatAbort && chatAbort.abort());
  $('regenerate-button').addEventListener('click', () => {
    if (chatAbort) return;
    const format = responseFormat();
    if (format === null) return;
    while (history.length && history[history.length - 1].role === 'assistant') {
      history.pop();
      views.pop().node.remove();
    }
    const lastUser = views.length ? views[views.length - 1].node : null;
    while (lastUser && lastUser.nextElementSibling) lastUser.nextElementSibling.remove(); // failed answers
    if (history.length) answer(format);
  });
  $('schema-input').addEventListener('input', () => { // an error already shown follows the edits; none appears yet
    const box = schemaBox();
    if (!$('schema-error').textContent) delete box.problem;
    showSchemaState(box);
  });
  $('schema-input').addEventListener('change', () => showSchemaState(schemaBox())); // left the box: say what is wrong
  $('clear-button').addEventListener('click', () => {
    if (chatAbort) return;
    history.length = 0;
    views.length = 0;
    $('messages').replaceChildren($('chat-empty'));
    $('chat-empty').hidden = false;
    setBusy(false);
    $('prompt').focus();
  });

  // ---- summarize --------------------------------------------------------------------------------------------------
  let summarizeAbort = null;

  $('summarize-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    if (summarizeAbort) return;
    const controller = summarizeAbort = new AbortController();
    const result = $('summarize-result');
    const meta = $('summarize-meta');
    $('summarize-card').hidden = false;
    result.replaceChildren();
    meta.textContent = 'summarizing…';
    $('summarize-button').disabled = true;
    $('summarize-stop').hidden = false;
    const t0 = performance.now();
    let text = '', usage = null;
    try {
      const body = { input: $('summarize-input').value, style: $('summarize-style').value, stream: true };
      const maxTokens = number('summarize-max-tokens', (v) => parseInt(v, 10));
      if (maxTokens) body.max_tokens = maxTokens;
      const response = await call('v1/summarize', body, controller.signal);
      for await (const event of sseEvents(response)) {
        if (event.usage) usage = event.usage;
        if (event.delta) {
          text += event.delta;
          renderMarkdown(text, result);
        }
      }
      if (!text.trim()) {
        result.append(el('p', { class: 'muted', 'data-testid': 'summary-empty', text: 'The model wrote only '
          + 'whitespace. Try a longer document, another style or more tokens.' }));
      }
      const seconds = (performance.now() - t0) / 1000;
      meta.textContent = `${fmt(seconds)} s` + (usage ? ` · ${usage.prompt_tokens} prompt + ${usage.completion_tokens} `
        + 'completion tokens (all chunks)' : '');
    } catch (err) {
      meta.textContent = '';
      if (err.name === 'AbortError') meta.textContent = 'stopped';
      else result.append(errorNote(err));
    } finally {
      summarizeAbort = null;
      $('summarize-button').disabled = false;
      $('summarize-stop').hidden = true;
    }
  });
  $('summarize-stop').addEventListener('click', () => summarizeAbort && summarizeAbort.abort());

  // ---- classify ---------------------------------------------------------------------------------------------------
  // One scored row: a label, a bar filled to `percent` (clamped to 0-100) with its progressbar attributes `bar`, and
  // the figure as text. Classify's probabilities and rerank's relevance scores both show as these.
  function scoreRow({ classes, testid, label, percent, figure, bar }) {
    const fill = el('span', { class: 'fill' });
    fill.style.width = `${Math.max(0, Math.min(100, percent))}%`;
    return el('div', { class: classes, 'data-testid': testid }, el('span', { class: 'label', text: label }),
      el('span', { class: 'bar', role: 'progressbar', ...bar }, fill), el('span', { class: 'pct', text: figure }));
  }

  const labels = [];
  const entry = $('label-entry');

  function drawLabels() {
    const box = $('classify-labels');
    box.replaceChildren(...labels.map((label) => el('span', { class: 'chip', 'data-testid': 'label-chip' },
      label, el('button', {
        type: 'button', class: 'remove', text: '×', 'aria-label': `remove label ${label}`,
        onclick: () => { labels.splice(labels.indexOf(label), 1); drawLabels(); entry.focus(); },
      }))), entry);
  }

  function addLabels(raw) {
    for (const label of raw.split(',').map((s) => s.trim()).filter(Boolean)) {
      if (!labels.includes(label) && labels.length < 64) labels.push(label);
    }
    drawLabels();
  }

  entry.addEventListener('keydown', (e) => {
    if ((e.key === 'Enter' || e.key === ',') && entry.value.trim()) {
      e.preventDefault();
      addLabels(entry.value);
      entry.value = '';
      entry.focus();
    } else if (e.key === 'Enter') {
      e.preventDefault();
    } else if (e.key === 'Backspace' && !entry.value && labels.length) {
      labels.pop();
      drawLabels();
      entry.focus();
    }
  });
  entry.addEventListener('blur', () => { if (entry.value.trim()) { addLabels(entry.value); entry.value = ''; } });
  $('classify-labels').addEventListener('click', (e) => { if (e.target === e.currentTarget) entry.focus(); });
  addLabels('positive, negative, neutral');

  $('classify-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    if (entry.value.trim()) { addLabels(entry.value); entry.value = ''; }
    const result = $('classify-result');
    const meta = $('classify-meta');
    $('classify-card').hidden = false;
    result.replaceChildren();
    if (!labels.length) {
      meta.textContent = 'add at least one label';
      return;
    }
    meta.textContent = 'classifying…';
    $('classify-button').disabled = true;
    const t0 = performance.now();
    try {
      const multi = $('multi-label').checked;
      const response = await call('v1/classify', { input: $('classify-input').value, labels: [...labels],
        multi_label: multi });
      const body = await response.json();
      const item = body.data[0];
      const chosen = new Set(multi ? (item.labels || []) : [item.label]);
      const scores = Object.entries(item.scores).sort((a, b) => b[1] - a[1]);
      result.append(el('div', { class: 'chips' }, ...[...chosen].map((label) =>
        el('span', { class: 'chip chosen', 'data-testid': 'chosen-label', text: label }))));
      for (const [label, p] of scores) {
        const pct = Math.round(p * 1000) / 10;
        result.append(scoreRow({ classes: `score${chosen.has(label) ? ' chosen' : ''}`, testid: 'score-row', label,
          percent: pct, figure: `${fmt(pct)}%`, bar: { 'aria-label': label, 'aria-valuemin': '0',
            'aria-valuemax': '100', 'aria-valuenow': String(pct) } }));
      }
      meta.textContent = `${fmt((performance.now() - t0) / 1000)} s · ${body.usage.prompt_tokens} prompt tokens scored`;
    } catch (err) {
      meta.textContent = '';
      result.append(errorNote(err));
    } finally {
      $('classify-button').disabled = false;
    }
  });

  // ---- embeddings and rerank (the encoder) ------------------------------------------------------------------------
  const lines = (id) => $(id).value.split('\n').map((s) => s.trim()).filter(Boolean);

  function cosine(a, b) {
    let dot = 0, aa = 0, bb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      aa += a[i] * a[i];
      bb += b[i] * b[i];
    }
    return dot / (Math.sqrt(aa * bb) || 1);
  }

  for (const radio of document.querySelectorAll('input[name=encoder-mode]')) {
    radio.addEventListener('change', () => {
      $('embed-form').hidden = radio.value !== 'embed';
      $('rerank-form').hidden = radio.value !== 'rerank';
      $('encoder-card').hidden = true;
    });
  }

  // Runs one encoder request: shows the result card, `draw(body)` fills it, errors are shown in it.
  async function encode(button, title, path, request, draw) {
    const result = $('encoder-result');
    const meta = $('encoder-meta');
    $('encoder-card').hidden = false;
    $('encoder-title').textContent = title;
    result.replaceChildren();
    meta.textContent = 'encoding…';
    button.disabled = true;
    const t0 = performance.now();
    try {
      const body = await (await call(path, request)).json();
      const seconds = (performance.now() - t0) / 1000;
      const facts = [...draw(body, result), `${body.usage.prompt_tokens} tokens`, body.model, `${fmt(seconds, 2)} s`];
      meta.textContent = facts.map((f) => f.replace(/ /g, '\u00a0')).join(' · '); // wraps between facts only
    } catch (err) {
      meta.textContent = '';
      result.append(errorNote(err));
    } finally {
      button.disabled = false;
    }
  }

  // The cosine similarity of every two texts, as a table whose cells are shaded by it.
  function drawSimilarity(texts, vectors, root) {
    const n = texts.length;
    const head = el('tr', {}, el('th', { scope: 'col' }, el('span', { class: 'visually-hidden', text: 'text' })),
      ...texts.map((text, j) => el('th', { scope: 'col', title: text, text: String(j + 1) })));
    const rows = texts.map((text, i) => el('tr', {},
      el('th', { scope: 'row', title: text }, el('span', { class: 'n', text: `${i + 1}` }), ' ',
        el('span', { class: 'text', text })),
      ...vectors.map((v, j) => {
        const sim = cosine(vectors[i], v);
        const cell = el('td', { text: sim.toFixed(2), title: `${i + 1} · ${j + 1}: ${sim.toFixed(4)}` });
        cell.style.setProperty('--shade', `${Math.round(Math.abs(sim) * 55)}%`);
        if (sim < 0) cell.classList.add('negative');
        return cell;
      })));
    root.append(el('div', { class: 'matrix-scroll' }, el('table', {
      class: 'matrix', 'data-testid': 'similarity-matrix', 'aria-label': `cosine similarity of ${n} texts`,
    }, el('thead', {}, head), el('tbody', {}, ...rows))));
  }

  $('embed-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const texts = lines('embed-input');
    if (!texts.length) return;
    encode($('embed-button'), 'Similarity', 'v1/embeddings', { input: texts }, (body, result) => {
      const vectors = [...body.data].sort((a, b) => a.index - b.index).map((d) => d.embedding);
      drawSimilarity(texts, vectors, result);
      return [`${texts.length} text${texts.length === 1 ? '' : 's'}`, `${vectors[0].length} dims`];
    });
  });

  $('rerank-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const documents = lines('rerank-documents');
    const query = $('rerank-query').value.trim();
    if (!query || !documents.length) return;
    encode($('rerank-button'), 'Ranked by relevance', 'v1/rerank', { query, documents }, (body, result) => {
      const ranked = [...body.results].sort((a, b) => b.relevance_score - a.relevance_score);
      ranked.forEach(({ index, relevance_score: score }, rank) => {
        result.append(scoreRow({ classes: `score document${rank === 0 ? ' chosen' : ''}`, testid: 'rerank-row',
          label: documents[index], percent: score * 100, figure: score.toFixed(3), bar: {
            'aria-label': `relevance of document ${index + 1}`, 'aria-valuemin': '-1', 'aria-valuemax': '1',
            'aria-valuenow': score.toFixed(4) } }));
      });
      return [`${documents.length} document${documents.length === 1 ? '' : 's'}`, 'cosine similarity'];
    });
  });

  // ---- start ------------------------------------------------------------------------------------------------------
  if (window.matchMedia('(max-width: 720px)').matches) $('chat-settings').open = false;
  document.addEventListener('visibilitychange', () => { if (!document.hidden) pollStatus(); });
  window.loomPlayground = { renderMarkdown, sseEvents }; // for tests and the curious
  setBusy(false);
  pollStatus();
})();
