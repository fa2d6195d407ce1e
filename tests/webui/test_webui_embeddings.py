"""The playground's Embeddings tab in a real browser (headless Chromium), against a server with all-MiniLM-L6-v2 beside
`dummy:tiny`: the similarity matrix of several texts, rerank in descending order, the server's refusals, text kept
as text, a phone's width; and without an encoder, no tab at all."""
from __future__ import annotations

from selenium.webdriver.common.keys import Keys

from tests.support.browser import by_testid, console_errors, fill, open_playground, paste, set_viewport, wait_for

XSS = '<img src=x onerror="window.__pwned=1">'
TEXTS = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply on Monday.", XSS]
DOCUMENTS = ["The central bank raised interest rates again.", "Cats sleep for most of the day.",
             "How to bake sourdough bread at home.", "Kittens need to eat several small meals a day."]


def open_tab(driver, url: str) -> None:
    console_errors(driver)  # what earlier tests left in the browser's log is theirs
    open_playground(driver, url)
    tab = wait_for(lambda: by_testid(driver, "tab-embeddings").is_displayed() and by_testid(driver, "tab-embeddings"),
                   message="the Embeddings tab never appeared")
    tab.click()


def matrix(driver) -> list[list[str]]:
    table = wait_for(lambda: by_testid(driver, "similarity-matrix", many=True), timeout=30, message="no matrix")[0]
    return [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in table.find_elements("css selector", "tbody tr")]


def test_the_tab_shows_the_similarity_of_every_two_texts(chromium, encoder_server):
    d = chromium
    open_tab(d, encoder_server)
    assert by_testid(d, "status-encoder").text == "all-MiniLM-L6-v2"
    fill(by_testid(d, "embed-input"), "\n".join([TEXTS[0], "", *TEXTS[1:], "  "]))  # blank lines are skipped
    by_testid(d, "embed-button").click()
    cells = matrix(d)
    n = len(TEXTS)
    assert len(cells) == n and all(len(row) == n for row in cells), cells
    sim = [[float(x) for x in row] for row in cells]
    assert all(sim[i][i] == 1.0 and cells[i][i] == "1.00" for i in range(n)), cells
    assert all(sim[i][j] == sim[j][i] and -1 <= sim[i][j] <= 1 for i in range(n) for j in range(n)), cells
    assert sim[0][1] > sim[0][2] + 0.2, cells  # cat ~ kitten, not ~ stock markets: the real model's vectors
    heads = [th.get_attribute("textContent") for th in d.find_elements("css selector", "tbody th")]
    assert heads == [f"{i + 1} {text}" for i, text in enumerate(TEXTS)], heads  # the markup is only text
    assert d.execute_script("return window.__pwned") is None
    assert not d.find_elements("css selector", "#encoder-result img")
    meta = by_testid(d, "encoder-meta").text
    assert meta.startswith(f"{n} texts · 384 dims · ") and " tokens · all-MiniLM-L6-v2 · " in meta, meta
    assert not console_errors(d)


def test_rerank_lists_the_documents_best_first(chromium, encoder_server):
    d = chromium
    open_tab(d, encoder_server)
    by_testid(d, "mode-rerank").click()
    assert not by_testid(d, "embed-input").is_displayed()
    fill(by_testid(d, "rerank-query"), "What do kittens eat?")
    fill(by_testid(d, "rerank-documents"), "\n".join(DOCUMENTS))
    by_testid(d, "rerank-button").click()
    rows = wait_for(lambda: by_testid(d, "rerank-row", many=True), timeout=30, message="no ranking")
    ranked = [(r.find_element("css selector", ".label").text,
               float(r.find_element("css selector", "[role=progressbar]").get_attribute("aria-valuenow")))
              for r in rows]
    scores = [score for _, score in ranked]
    assert sorted(text for text, _ in ranked) == sorted(DOCUMENTS) and scores == sorted(scores, reverse=True), ranked
    assert ranked[0][0] == DOCUMENTS[3], ranked
    assert [r.find_element("css selector", ".pct").text for r in rows] == [f"{s:.3f}" for s in scores]
    assert "chosen" in rows[0].get_attribute("class")
    meta = by_testid(d, "encoder-meta").text
    assert meta.startswith("4 documents · cosine similarity · ") and "all-MiniLM-L6-v2" in meta, meta

    # A document longer than the model takes: the server's 400, shown in the card.
    paste(by_testid(d, "rerank-documents"), "loom " * 2000)
    by_testid(d, "rerank-button").click()
    error = wait_for(lambda: by_testid(d, "error-message", many=True), timeout=30, message="no error shown")[0]
    assert error.text.startswith("400: documents[1] has ") and "maximum input length" in error.text, error.text
    assert not by_testid(d, "rerank-row", many=True) and by_testid(d, "rerank-button").is_enabled()


def test_the_tab_fits_a_phone(chromium, encoder_server):
    d = chromium
    try:
        set_viewport(d, 390, 844, mobile=True)
        open_tab(d, encoder_server)
        fill(by_testid(d, "embed-input"), "\n".join(TEXTS * 2))  # 8 x 8: the table scrolls in its own box
        by_testid(d, "embed-button").click()
        matrix(d)
        assert d.execute_script("return document.documentElement.scrollWidth") <= 390
        by_testid(d, "mode-rerank").click()
        fill(by_testid(d, "rerank-query"), "kittens")
        fill(by_testid(d, "rerank-documents"), "\n".join(DOCUMENTS))
        by_testid(d, "rerank-button").click()
        wait_for(lambda: by_testid(d, "rerank-row", many=True), timeout=30, message="no ranking")
        assert d.execute_script("return document.documentElement.scrollWidth") <= 390
    finally:
        set_viewport(d, 1280, 800)


def test_without_an_encoder_there_is_no_tab(chromium, server):
    d = chromium
    open_playground(d, server)
    assert not by_testid(d, "tab-embeddings").is_displayed()
    assert not by_testid(d, "status-encoder").is_displayed()
    by_testid(d, "tab-classify").click()
    by_testid(d, "tab-classify").send_keys(Keys.ARROW_RIGHT)  # the arrow keys skip the hidden tab
    assert d.switch_to.active_element == by_testid(d, "tab-chat")
    assert by_testid(d, "tab-chat").get_attribute("aria-selected") == "true"
