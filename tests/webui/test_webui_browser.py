"""The playground in a real browser (headless Chromium via selenium) against a real server over `dummy:tiny`: chat
streams in and can be stopped (the server frees the sequence), markup in answers stays text, a JSON schema holds the
answer to it (and a bad one is refused before or by the server), summarize and classify show results, the API-key
prompt works, and nothing overflows a phone's width."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
from selenium.webdriver.common.keys import Keys

from tests.support.browser import by_testid, console_errors, fill, open_playground, server_status, wait_for

XSS = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def answers(driver):
    return by_testid(driver, "assistant-message", many=True)


def last_answer_done(driver):
    """The last answer's stats line, once it has one (the answer is finished)."""
    found = answers(driver)
    return found and found[-1].find_element("css selector", '[data-testid="answer-stats"]').text


def settings(driver, max_tokens: int, seed: int = 1) -> None:
    fill(by_testid(driver, "max-tokens"), str(max_tokens))
    fill(by_testid(driver, "seed"), str(seed))


def test_chat_answer_streams_in_with_its_stats(chromium, server):
    d = chromium
    open_playground(d, server)
    settings(d, max_tokens=40)
    prompt = by_testid(d, "prompt-input")
    prompt.send_keys("Tell me a story", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "about looms.")
    assert prompt.get_attribute("value") == "Tell me a story\nabout looms."  # Shift+Enter: a new line, not sent
    assert not answers(d)
    # Record the answer's text length at every DOM change, in the page itself (no polling gaps).
    d.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
          const a = document.querySelectorAll('[data-testid=assistant-text]');
          if (a.length) window.__lengths.push(a[a.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    """)
    prompt.send_keys(Keys.ENTER)  # Enter sends
    assert by_testid(d, "stop-button").is_displayed()
    stats = wait_for(lambda: last_answer_done(d), timeout=30, message="the answer never finished")
    lengths = [n for n in d.execute_script("return window.__lengths") if n]
    grew = sorted(set(lengths))
    assert len(grew) >= 5, f"the answer did not stream in over several frames: {lengths}"
    assert lengths == sorted(lengths), lengths
    assert by_testid(d, "user-message").text.endswith("Tell me a story\nabout looms.")
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ prompt \+ 40 completion tokens · stopped at max tokens",
                     stats), stats
    assert not by_testid(d, "stop-button").is_displayed() and by_testid(d, "send-button").is_enabled()

    # Regenerate replaces the last answer; Clear empties the conversation.
    first = by_testid(d, "assistant-text").text
    fill(by_testid(d, "seed"), "2")
    by_testid(d, "regenerate-button").click()
    wait_for(lambda: last_answer_done(d), timeout=30, message="the regenerated answer never finished")
    assert len(answers(d)) == 1 and by_testid(d, "assistant-text").text != first
    by_testid(d, "clear-button").click()
    assert not answers(d) and not by_testid(d, "user-message", many=True)
    assert not console_errors(d)


def test_stop_aborts_midway_and_the_server_frees_the_sequence(chromium, server):
    d = chromium
    open_playground(d, server)
    settings(d, max_tokens=1500)
    before = aborted_chats(server)
    by_testid(d, "prompt-input").send_keys("Write a very long essay.", Keys.ENTER)
    wait_for(lambda: len(by_testid(d, "assistant-text").text) > 20, timeout=30, message="no text arrived")
    assert server_status(server)["running"] == 1
    by_testid(d, "stop-button").click()
    stats = wait_for(lambda: last_answer_done(d), timeout=10, message="the answer did not end on Stop")
    assert "stopped" in stats and "completion tokens" not in stats  # ended by the client, before any usage
    text = by_testid(d, "assistant-text").text
    assert 0 < len(text)
    wait_for(lambda: server_status(server)["running"] == 0 and server_status(server)["waiting"] == 0, timeout=5,
             message=f"the server still runs the request: {server_status(server)}")
    wait_for(lambda: aborted_chats(server) == before + 1, timeout=5, message="the server never counted the abort")
    wait_for(lambda: by_testid(d, "status-running").text == "0", timeout=5, message="the strip never showed 0")
    assert by_testid(d, "send-button").is_enabled()


def aborted_chats(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    m = re.search(r'^loom_requests_total\{endpoint="chat",finish_reason="abort",model="[^"]*"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_markup_from_the_user_or_the_model_renders_as_text(chromium, server):
    d = chromium
    open_playground(d, server)
    settings(d, max_tokens=4)
    by_testid(d, "prompt-input").send_keys(XSS, Keys.ENTER)  # the user's own text, through the real server
    wait_for(lambda: last_answer_done(d), timeout=30, message="the answer never finished")
    assert by_testid(d, "user-message").text.endswith(XSS)

    # The model's answer: the page's fetch is stubbed with an SSE stream whose deltas carry markup, split across
    # network chunks mid-event, so the page's own SSE parser and renderer handle it.
    d.execute_script("""
        const payload = arguments[0];
        const events = [{choices: [{index: 0, delta: {role: 'assistant', content: ''}}]},
                        {choices: [{index: 0, delta: {content: payload.slice(0, 9)}}]},
                        {choices: [{index: 0, delta: {content: payload.slice(9) + arguments[1]}}]},
                        {choices: [{index: 0, delta: {}, finish_reason: 'stop'}]},
                        {choices: [], usage: {prompt_tokens: 5, completion_tokens: 3, total_tokens: 8}}];
        const wire = events.map((e) => 'data: ' + JSON.stringify(e) + '\\n\\n').join('') + 'data: [DONE]\\n\\n';
        const bytes = new TextEncoder().encode(wire);
        const realFetch = window.fetch;
        window.fetch = (url, init) => {
          if (!String(url).includes('chat/completions')) return realFetch(url, init);
          const body = new ReadableStream({start(c) {
            for (let i = 0; i < bytes.length; i += 37) c.enqueue(bytes.slice(i, i + 37));
            c.close();
          }});
          return Promise.resolve(new Response(body, {headers: {'content-type': 'text/event-stream'}}));
        };
    """, XSS, "\n\n**bold** [x](javascript:alert(1))")
    by_testid(d, "prompt-input").send_keys("say something dangerous", Keys.ENTER)
    wait_for(lambda: len(answers(d)) == 2 and last_answer_done(d), message="the stubbed answer never finished")
    answer = by_testid(d, "assistant-text", many=True)[-1]
    assert answer.text.startswith(XSS), answer.text
    assert answer.find_element("css selector", "strong").text == "bold"
    assert not answer.find_elements("css selector", "a")  # a javascript: link stays text
    assert "[x](javascript:alert(1))" in answer.text
    messages = by_testid(d, "messages")
    assert not messages.find_elements("css selector", "img, script, iframe")
    assert d.execute_script("return window.__pwned") is None


def test_markdown_renderer_builds_only_safe_elements(chromium, server):
    d = chromium
    open_playground(d, server, model=None)
    nasty = [XSS, '<a href="javascript:alert(1)">x</a>', "[x](javascript:alert(1))", "[x](data:text/html,<b>)",
             '```html\n<script>alert(1)</script>\n```', "`<img src=x onerror=alert(1)>`", "**<b onclick=x>**",
             "- <svg onload=alert(1)>\n- [ok](https://example.com/?q=<b>)", "# <h1>title</h1>",
             '<iframe srcdoc="<script>parent.__pwned=1</script>">', "&lt;img src=x onerror=alert(1)&gt;"]
    report = d.execute_script("""
        return arguments[0].map((src) => {
          const root = window.loomPlayground.renderMarkdown(src, document.createElement('div'));
          const nodes = [...root.querySelectorAll('*')];
          return {tags: nodes.map((n) => n.tagName.toLowerCase()),
                  attrs: nodes.flatMap((n) => [...n.attributes].map((a) => a.name + '=' + a.value)),
                  text: root.textContent};
        });
    """, nasty)
    allowed = {"p", "strong", "em", "code", "pre", "ul", "ol", "li", "a", "h3", "h4", "h5", "h6"}
    for src, r in zip(nasty, report):
        assert set(r["tags"]) <= allowed, (src, r)
        for attr in r["attrs"]:
            name, _, value = attr.partition("=")
            assert name in ("href", "target", "rel", "data-lang"), (src, attr)
            if name == "href":
                assert value.startswith("https://example.com/"), (src, attr)
    assert "<script>alert(1)</script>" in report[4]["text"] and report[4]["tags"] == ["pre", "code"]
    assert report[10]["text"] == nasty[10]  # entities are not decoded either

    html = d.execute_script("return window.loomPlayground.renderMarkdown(arguments[0], "
                            "document.createElement('div')).innerHTML",
                            "# Title\nSome **bold**, *italic*, `code` and a [link](https://example.com).\n\n"
                            "- one\n- two\n-\n\n1. first\n2. second\n\n```py\nx = 1 < 2\n```")
    assert html == ('<h3>Title</h3><p>Some <strong>bold</strong>, <em>italic</em>, <code>code</code> and a '
                    '<a href="https://example.com/" target="_blank" rel="noopener noreferrer nofollow">link</a>.</p>'
                    '<ul><li>one</li><li>two</li></ul><ol><li>first</li><li>second</li></ol>'
                    '<pre><code data-lang="py">x = 1 &lt; 2</code></pre>')
    assert d.execute_script("return window.__pwned") is None


SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                          "rainy": {"type": "boolean"},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "rainy", "days"], "additionalProperties": False}

SPY_ON_CHAT = """
    window.__chatBodies = [];
    const realFetch = window.fetch;
    window.fetch = (url, init) => {
      if (String(url).includes('chat/completions')) window.__chatBodies.push(JSON.parse(init.body));
      return realFetch(url, init);
    };
"""


def fill_schema(driver, text: str) -> None:
    """Open the (folded) JSON-schema box and put `text` in it, as a paste does."""
    if not driver.find_element("id", "schema-details").get_attribute("open"):
        driver.find_element("css selector", "#schema-details summary").click()
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                          by_testid(driver, "schema-input"), text)


def test_a_json_schema_holds_the_answer_to_it(chromium, server):
    d = chromium
    open_playground(d, server)
    settings(d, max_tokens=200)
    d.execute_script(SPY_ON_CHAT)
    fill_schema(d, json.dumps(SCHEMA, indent=2))
    assert by_testid(d, "schema-error").text == ""
    by_testid(d, "prompt-input").send_keys("What is the weather in Lyon?", Keys.ENTER)
    stats = wait_for(lambda: last_answer_done(d), timeout=60, message="the constrained answer never finished")
    assert "stop" in stats and "JSON schema" in stats, stats
    (sent,) = d.execute_script("return window.__chatBodies")
    assert sent["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "playground", "schema": SCHEMA, "strict": True}}
    shown = by_testid(d, "assistant-text")
    assert shown.find_element("css selector", "pre code").get_attribute("data-lang") == "json"
    jsonschema.validate(json.loads(shown.text), SCHEMA)  # what the page shows is the JSON the schema asked for
    assert not console_errors(d)

    # A schema the server cannot enforce: its 400 is the answer's error, and the conversation goes on.
    fill_schema(d, '{"type": "array", "uniqueItems": true}')
    by_testid(d, "prompt-input").send_keys("A list, please.", Keys.ENTER)
    error = wait_for(lambda: by_testid(d, "error-message", many=True), timeout=30, message="no error shown")[0]
    assert error.text.startswith("400: unsupported JSON schema") and "uniqueItems" in error.text, error.text
    assert by_testid(d, "send-button").is_enabled()
    assert [e for e in console_errors(d) if "status of 400" not in e] == []  # the browser logs the refusal itself


def test_a_schema_that_is_not_json_is_refused_in_the_page(chromium, server):
    d = chromium
    open_playground(d, server)
    settings(d, max_tokens=3)
    d.execute_script(SPY_ON_CHAT)
    error = by_testid(d, "schema-error")
    prompt = by_testid(d, "prompt-input")
    fill_schema(d, '{"type": "object",')
    assert not error.is_displayed()  # no error while the schema is being written...
    prompt.send_keys("hello", Keys.ENTER)
    assert error.is_displayed() and error.text.startswith("Not valid JSON"), error.text  # ...but on sending it
    assert by_testid(d, "schema-input").get_attribute("aria-invalid") == "true"
    assert d.switch_to.active_element == by_testid(d, "schema-input")
    assert prompt.get_attribute("value") == "hello"  # kept, to send once the schema is fixed
    fill_schema(d, '["a", "b"]')  # valid JSON, yet no schema: the shown error follows the edit
    assert "is an object" in error.text, error.text
    prompt.send_keys(Keys.ENTER)
    assert "is an object" in error.text, error.text
    assert not by_testid(d, "user-message", many=True) and not answers(d)
    assert d.execute_script("return window.__chatBodies") == []

    # Emptying the box clears the error, and the chat is free text again.
    fill_schema(d, "")
    assert not error.is_displayed() and by_testid(d, "schema-input").get_attribute("aria-invalid") == "false"
    prompt.send_keys(Keys.ENTER)
    wait_for(lambda: last_answer_done(d), timeout=30, message="the answer never finished")
    (sent,) = d.execute_script("return window.__chatBodies")
    assert "response_format" not in sent


def test_summarize_and_classify_tabs_show_results(chromium, server):
    d = chromium
    open_playground(d, server)
    by_testid(d, "tab-summarize").click()
    assert not by_testid(d, "prompt-input").is_displayed()
    fill(by_testid(d, "summarize-input"), "The loom weaves threads into cloth. " * 20)
    fill(by_testid(d, "summarize-max-tokens"), "12")
    by_testid(d, "summarize-button").click()
    meta = wait_for(lambda: "completion tokens" in by_testid(d, "summarize-meta").text
                    and by_testid(d, "summarize-meta").text, timeout=30, message="no summary")
    assert re.search(r"\d+ prompt \+ 12 completion tokens", meta), meta
    # The dummy model's greedy summary is 12 new lines: the page says so rather than showing a blank card.
    result = by_testid(d, "summarize-result")
    assert result.is_displayed() and (result.text.strip() or by_testid(d, "summary-empty", many=True))

    by_testid(d, "tab-classify").click()
    fill(by_testid(d, "classify-input"), "I love this loom, it works perfectly.")
    chips = lambda: [c.text.rstrip("×").strip() for c in by_testid(d, "label-chip", many=True)]  # noqa: E731
    assert chips() == ["positive", "negative", "neutral"]
    by_testid(d, "label-entry").send_keys("urgent", Keys.ENTER)
    by_testid(d, "label-chip", many=True)[2].find_element("css selector", "button").click()  # drop "neutral"
    assert chips() == ["positive", "negative", "urgent"]
    by_testid(d, "classify-button").click()
    rows = wait_for(lambda: by_testid(d, "score-row", many=True), timeout=30, message="no scores")
    scores = {r.find_element("css selector", ".label").text:
              float(r.find_element("css selector", "[role=progressbar]").get_attribute("aria-valuenow")) for r in rows}
    assert set(scores) == {"positive", "negative", "urgent"}
    assert abs(sum(scores.values()) - 100) < 0.5, scores  # one of the labels: probabilities sum to 1
    chosen = by_testid(d, "chosen-label").text
    assert scores[chosen] == max(scores.values())
    assert "prompt tokens" in by_testid(d, "classify-meta").text
    assert not console_errors(d)


def test_api_key_prompt(chromium, keyed_server):
    d = chromium
    url, key = keyed_server
    open_playground(d, url, model=None)
    dialog = by_testid(d, "api-key-dialog")
    wait_for(dialog.is_displayed, message="the page did not ask for the key")  # its status poll got a 401
    assert by_testid(d, "status-model").text == "API key needed"
    d.find_element("id", "key-cancel").click()
    settings(d, max_tokens=5)
    by_testid(d, "prompt-input").send_keys("hello", Keys.ENTER)
    error = wait_for(lambda: by_testid(d, "error-message", many=True), message="no error shown")[0]
    assert error.text.startswith("401: missing API key"), error.text
    wait_for(dialog.is_displayed, message="a refused request did not ask for the key again")

    fill(by_testid(d, "api-key-input"), "wrong-key")
    by_testid(d, "api-key-save").click()
    wait_for(lambda: "incorrect API key" in by_testid(d, "api-key-error").text, message="a wrong key was not named")
    fill(by_testid(d, "api-key-input"), key)
    by_testid(d, "api-key-save").click()
    wait_for(lambda: by_testid(d, "status-model").text == "dummy:tiny", message="the key did not unlock the status")
    assert not dialog.is_displayed()
    assert d.execute_script("return sessionStorage.getItem('loom-api-key')") == key
    by_testid(d, "regenerate-button").click()  # the refused turn, asked again with the key
    stats = wait_for(lambda: last_answer_done(d), timeout=30, message="no answer with the key")
    assert "5 completion tokens" in stats
    assert len(answers(d)) == 1 and not by_testid(d, "error-message", many=True)
    d.execute_script("sessionStorage.clear(); localStorage.clear()")


def test_every_tab_fits_a_phone_and_every_control_has_a_label(chromium, server):
    from tests.support.browser import set_viewport

    d = chromium
    try:
        set_viewport(d, 390, 844, mobile=True)
        open_playground(d, server)
        for tab in ("tab-chat", "tab-summarize", "tab-classify"):
            by_testid(d, tab).click()
            width = d.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, f"{tab}: the page is {width} px wide on a 390 px phone"
        unlabelled = d.execute_script("""
            return [...document.querySelectorAll('input, textarea, select')]
              .filter((e) => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
              .map((e) => e.id);
        """)
        assert not unlabelled, unlabelled
    finally:
        set_viewport(d, 1280, 800)
