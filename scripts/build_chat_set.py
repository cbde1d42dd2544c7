"""Build the bundled model's chat set, by rule, from the corpus: every answer is checkable against the text.

    python scripts/build_chat_set.py --corpus data/corpus --out data/sft/chats.jsonl [--per-kind 3000] [--seed 0]

Kinds of conversation (English and Chinese), each answer taken from the corpus itself:
- continue a passage of a Jane Austen novel, or a Bible verse, or a Tang/Song poem (the true continuation);
- name the novel a passage is from, the Bible book a verse is from, the poet of a poem (the true source);
- say who speaks a line of a Shakespeare play (the speaker heading in the text);
- say what the model is (a fixed, honest description).
Some conversations carry a system message, some have two turns. Output: one {"messages": [...]} per line.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

IDENTITY_EN = ("I am dsv2-nano-chat, a tiny language model with the DeepSeek-V2 architecture, trained from scratch "
               "by the dsv2 project on public-domain books: Jane Austen's novels, the World English Bible, "
               "Shakespeare's plays and classical Chinese poems. I am far too small to be reliable.")
IDENTITY_ZH = "我是 dsv2-nano-chat，一个采用 DeepSeek-V2 架构的小模型，由 dsv2 项目用公版书籍从零训练而成。"
SYSTEMS = ["You are a helpful assistant.", "You are dsv2-nano-chat.", "Answer briefly."]


def sections(text: str, marker: str) -> Iterator[tuple[str, str]]:
    """(heading, body) for every "<marker> heading" line of a corpus file."""
    parts = re.split(rf"^{re.escape(marker)} (.+)$", text, flags=re.MULTILINE)
    for i in range(1, len(parts) - 1, 2):
        yield parts[i].strip(), parts[i + 1]


def sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s]


def austen(corpus: Path) -> list[tuple[str, str]]:
    """(novel, paragraph) pairs of real prose paragraphs (long enough, not headings)."""
    out = []
    for title, body in sections((corpus / "austen.txt").read_text(encoding="utf-8"), "#"):
        for para in body.split("\n\n"):
            para = " ".join(para.split())
            if 200 <= len(para) <= 900 and len(sentences(para)) >= 3 and not para.isupper():
                out.append((title, para))
    return out


def bible(corpus: Path) -> list[tuple[str, str]]:
    """(reference, verse text) for every verse."""
    verses = []
    for chapter, body in sections((corpus / "bible_web.txt").read_text(encoding="utf-8"), "##"):
        for line in body.splitlines():
            match = re.match(r"^(\d+) (.+)$", line.strip())
            if match and len(match.group(2)) > 40:
                verses.append((f"{chapter}:{match.group(1)}", match.group(2)))
    return verses


def shakespeare(corpus: Path) -> list[tuple[str, str, str]]:
    """(play, speaker, first line of the speech) for speeches under an all-caps speaker heading."""
    speeches = []
    for play, body in sections((corpus / "shakespeare.txt").read_text(encoding="utf-8"), "#"):
        for block in body.split("\n\n"):
            lines = [line.strip() for line in block.strip().splitlines()]
            if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Z ']+\.", lines[0]) and len(lines[1]) > 25 \
                    and not lines[1].startswith("["):
                speaker = lines[0].rstrip(".").title()
                speeches.append((play, speaker, lines[1]))
    return speeches


def poems(corpus: Path) -> list[tuple[str, str, list[str]]]:
    """(title, poet, lines) of the Tang and Song poems."""
    out = []
    for name in ("tang300.txt", "song100.txt"):
        for block in (corpus / name).read_text(encoding="utf-8").split("\n\n"):
            lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
            if len(lines) < 3:
                continue
            title = re.sub(r"^题目[:：]", "", lines[0]).strip("《》")
            poet = re.sub(r"^作者[:：]", "", lines[1])
            poet = re.sub(r"（.*?）", "", poet).strip()
            out.append((title, poet, lines[2:]))
    return out


def conversation(rng: random.Random, question: str, answer: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.2 else []
    return [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def build(corpus: Path, per_kind: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    paragraphs = austen(corpus)
    verses, speeches, chinese = bible(corpus), shakespeare(corpus), poems(corpus)
    chats = []

    for title, para in rng.sample(paragraphs, min(per_kind, len(paragraphs))):
        parts = sentences(para)
        cut = rng.randint(1, min(2, len(parts) - 1))
        chats.append(conversation(rng, f"Continue this passage from {title} by Jane Austen:\n\n{' '.join(parts[:cut])}",
                                  " ".join(parts[cut:cut + 2])))
    for title, para in rng.sample(paragraphs, min(per_kind, len(paragraphs))):
        chats.append(conversation(rng, f"Which Jane Austen novel is this passage from?\n\n{para}",
                                  f"It is from {title}."))
    for ref, verse in rng.sample(verses, min(per_kind, len(verses))):
        words = verse.split()
        cut = len(words) // 2
        chats.append(conversation(rng, f"Continue this verse ({ref}): {' '.join(words[:cut])}", " ".join(words[cut:])))
    for ref, verse in rng.sample(verses, min(per_kind, len(verses))):
        book = ref.rsplit(" ", 1)[0]
        chats.append(conversation(rng, f"Which book of the Bible is this verse from?\n\n{verse}",
                                  f"It is from the book of {book} ({ref})."))
    for play, speaker, line in rng.sample(speeches, min(per_kind, len(speeches))):
        chats.append(conversation(rng, f"In Shakespeare's {play}, who says: \"{line}\"?", f"{speaker} says it."))
    for title, _, lines in rng.choices(chinese, k=min(per_kind, 3 * len(chinese))):
        cut = rng.randint(1, max(1, len(lines) - 1))
        chats.append(conversation(rng, f"请接着写这首诗：《{title}》\n{''.join(lines[:cut])}", "".join(lines[cut:])))
    for title, poet, _ in rng.choices(chinese, k=min(per_kind, 2 * len(chinese))):
        chats.append(conversation(rng, f"《{title}》的作者是谁？", f"《{title}》的作者是{poet}。"))
    for _ in range(max(50, per_kind // 20)):
        question, answer = rng.choice([("Who are you?", IDENTITY_EN), ("What are you?", IDENTITY_EN),
                                       ("你是谁？", IDENTITY_ZH), ("Introduce yourself.", IDENTITY_EN)])
        chats.append(conversation(rng, question, answer))
    rng.shuffle(chats)
    merged, i = [], 0
    while i < len(chats):  # one conversation in seven gets a second turn: the next one
        first = chats[i]
        if i % 7 == 0 and i + 1 < len(chats) and chats[i + 1][0]["role"] != "system":
            merged.append(first + chats[i + 1])
            i += 2
        else:
            merged.append(first)
            i += 1
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="data/corpus", type=Path)
    parser.add_argument("--out", default="data/sft/chats.jsonl", type=Path)
    parser.add_argument("--per-kind", type=int, default=3000, help="conversations of each kind (at most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    chats = build(args.corpus, args.per_kind, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for messages in chats:
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    print(f"{len(chats)} conversations → {args.out}")


if __name__ == "__main__":
    main()
