"""Generated pages of text with known strings and positions, for the `text` recognizer's tests (and the pages of
its benchmark, bench.text), and the scores of a reading against the truth (word recall, character error rate).

Text is rendered with Pillow in matplotlib's bundled DejaVu Sans (both come with the `test` and `bench` extras), so
every page is the same on every machine. Each `LineTruth` is one line as placed: its string and box; a page's
truths are listed in reading order (columns left to right, lines top to bottom). Scoring uses rapidfuzz's
Levenshtein distance (the same extras).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class LineTruth:
    text: str
    box: tuple[int, int, int, int]  # x, y, w, h in the page's pixels (before any turn of the page)


@dataclass
class TextPage:
    image: np.ndarray  # grey, 8-bit, black text on white
    lines: list[LineTruth]  # in reading order

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def words(self) -> list[str]:
        return self.text.split()


@lru_cache(maxsize=8)
def font(size: int) -> Any:
    """DejaVu Sans at `size` pixels, from matplotlib's own fonts."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)


def words(count: int, seed: int = 0) -> list[str]:
    """`count` distinct made-up words of 2–4 syllables (a third capitalised), so each can be found once."""
    rng = np.random.default_rng(seed)
    found: dict[str, None] = {}
    while len(found) < count:
        syllables = int(rng.integers(2, 5))
        word = "".join(str(rng.choice(list(CONSONANTS))) + str(rng.choice(list(VOWELS))) for _ in range(syllables))
        found.setdefault(word.capitalize() if rng.random() < 0.33 else word, None)
    return list(found)


def text_width(text: str, size: int) -> int:
    """The width Pillow gives `text` in DejaVu Sans at `size` px."""
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def draw_lines(image: np.ndarray, placed: Sequence[tuple[int, int, str]], size: int) -> list[LineTruth]:
    """Draw each (x, y, text) in black at `size` px onto a grey page, in place; each line's truth (its ink's box)."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    pen = ImageDraw.Draw(picture)
    truths = []
    for x, y, text in placed:
        pen.text((x, y), text, font=font(size), fill=0)
        left, top, right, bottom = pen.textbbox((x, y), text, font=font(size))
        truths.append(LineTruth(text, (int(left), int(top), int(right - left), int(bottom - top))))
    image[:] = np.asarray(picture)
    return truths


def wrap(vocabulary: Sequence[str], width: int, size: int) -> list[str]:
    """The words in order, wrapped into lines at most `width` px wide."""
    lines, current = [], ""
    for word in vocabulary:
        candidate = f"{current} {word}".strip()
        if current and text_width(candidate, size) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines


def column_page(
    vocabulary: Sequence[str],
    columns: int = 2,
    width: int = 2400,
    size: int = 28,
    margin: int = 120,
    gutter: int = 90,
    leading: float = 1.5,
    paragraph: int = 8,
) -> TextPage:
    """A page of `columns` columns filled with the words in order, each column's lines top to bottom, paragraphs of
    `paragraph` lines with a blank line between; the page is as tall as the text needs.

    Args:
        vocabulary: the words, in reading order.
        columns: how many columns.
        width: the page's width in px; the columns share it less the margins and gutters.
        size: the font size in px.
        margin, gutter: blank space around the page and between columns, px.
        leading: line pitch in font sizes.
        paragraph: lines per paragraph.
    """
    column_width = (width - 2 * margin - (columns - 1) * gutter) // columns
    lines = wrap(vocabulary, column_width, size)
    per_column = -(-len(lines) // columns)
    pitch = round(size * leading)
    rows = per_column + per_column // paragraph
    height = 2 * margin + rows * pitch
    placed = []
    for k, text in enumerate(lines):
        column, row = divmod(k, per_column)
        y = margin + (row + row // paragraph) * pitch
        placed.append((margin + column * (column_width + gutter), y, text))
    image = np.full((height, width), 255, np.uint8)
    return TextPage(image, draw_lines(image, placed, size))


def seam_page(size: int = 28, seed: int = 0) -> TextPage:
    """A 2600x1400 page for the default tiling (640 px tiles, 20 % overlap: tiles start every 512 px): a heading
    that crosses one vertical seam, a line that crosses two, a line across the whole page (longer than three
    tiles), a line on a horizontal seam, then two columns, the left one's lines crossing a seam, the right one's
    crossing two. Every string is different.

    Returns:
        The page, its lines in reading order.
    """
    vocabulary = iter(words(400, seed))

    def line(width: int) -> str:
        text, word = next(vocabulary), next(vocabulary)
        while text_width(f"{text} {word}", size) <= width:
            text, word = f"{text} {word}", next(vocabulary)
        return text

    placed = [
        (300, 80, line(560)),  # 300..860: crosses x = 512 and 640
        (400, 170, line(1000)),  # 400..1400: crosses two tile borders each side
        (60, 260, line(2480)),  # 60..2540: five tiles
        (200, 495, line(700)),  # its top tile ends at y = 640 - a few rows of it are in the tile below (from 512)
    ]
    left = [(100, 620 + 60 * k, line(1060)) for k in range(12)]  # 100..1160 at most, 12 rows
    right = [(1300, 620 + 60 * k, line(1200)) for k in range(12)]  # 1300..2500 at most
    image = np.full((1400, 2600), 255, np.uint8)
    return TextPage(image, draw_lines(image, placed + left + right, size))


def turned(page: TextPage, quarter_turns: int = 0, skew: float = 0.0) -> np.ndarray:
    """The page turned by quarter turns clockwise, then by `skew` degrees clockwise on a white ground (grown so no
    text leaves the picture)."""
    image = np.rot90(page.image, -quarter_turns % 4).copy()
    if not skew:
        return image
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), -skew, 1.0)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    grown = (int(height * sin + width * cos) + 2, int(height * cos + width * sin) + 2)
    matrix[:, 2] += (grown[0] / 2 - width / 2, grown[1] / 2 - height / 2)
    return cv2.warpAffine(image, matrix, grown, flags=cv2.INTER_CUBIC, borderValue=255)


def word_recall(truth: Sequence[str], found: Sequence[str]) -> float:
    """The share of the truth's words found, each as often as it occurs (a word read twice counts once)."""
    if not truth:
        return 1.0
    have = Counter(found)
    return sum(min(n, have[word]) for word, n in Counter(truth).items()) / len(truth)


def duplicated_words(truth: Sequence[str], found: Sequence[str]) -> int:
    """How many words were found more often than the truth has them."""
    want = Counter(truth)
    return sum(max(0, n - want[word]) for word, n in Counter(found).items() if word in want)


def character_error_rate(truth: str, found: str) -> float:
    """Levenshtein distance between the two texts over the truth's length, white space normalised to one space
    (line breaks and blank lines are layout, not characters read)."""
    from rapidfuzz.distance import Levenshtein

    expected, got = " ".join(truth.split()), " ".join(found.split())
    return Levenshtein.distance(expected, got) / max(1, len(expected))
