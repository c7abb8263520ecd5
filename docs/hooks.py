"""MkDocs hook: the README is the site's front page (docs/index.md stands for it), with its links into docs/ made
links within the site."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def on_page_markdown(markdown: str, page, **_: object) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return README.read_text().replace("](docs/", "](")
