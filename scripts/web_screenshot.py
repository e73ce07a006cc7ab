"""The screenshot in docs/serving.md: the web page of a running `dglocal serve` (the Sudoku model by default),
as it showed the sample puzzle's n-th draft (later drafts and the answer are held back from the page, so the
picture does not depend on how fast the machine is).

    dglocal serve &                                   # then
    python scripts/web_screenshot.py http://127.0.0.1:8080/ docs/images/web-sudoku.png
"""

from __future__ import annotations

import sys

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(url: str, out: str, draft: int = 2) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1100, "height": 620})
        page.goto(url)
        page.evaluate(f"""() => {{
            const show = showDraft;
            let n = 0;
            showDraft = (d) => (++n <= {draft} ? show(d) : undefined);
            showSolution = () => undefined;
        }}""")
        page.click("#sample")
        page.fill("#seed", "1")
        page.click("#solve")
        page.wait_for_function("document.querySelector('.msg.assistant') && "
                               "document.querySelector('.msg.assistant').dataset.done")
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:3], *map(int, sys.argv[3:4]))
