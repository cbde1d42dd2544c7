"""Answer extraction and checking for the model card's benchmarks.

GSM8K: the number after "The answer is" (else the last number), compared numerically. MATH: the last \\boxed{...}
(else the text after "The answer is"), normalized as in the MATH release's equivalence check, then compared by value
where both sides are numbers or simple fractions (\\frac{3}{4} = 0.75 = 3/4, -\\frac{1}{2} = \\frac{-1}{2}). BBH: the
text after "So the answer is", compared exactly (case-insensitive, surrounding punctuation and markdown emphasis
ignored; a multiple-choice target "(A)" also accepts "A" and "(A) <the option's text>"). A Unicode minus sign (U+2212)
is a minus.
"""

from __future__ import annotations

import math
import re

NUMBER = re.compile(r"-?[\d,]*\.?\d+")


THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")  # 1,000 or 12,345.5: commas that group digits


def _to_number(text: str) -> float | None:
    """A plain number, with commas only as thousands separators ("1,2" is a list, not twelve)."""
    text = text.replace("$", "").strip().rstrip(".")
    if THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def gsm8k_reference(answer: str) -> str:
    """The final number of a GSM8K solution ("... #### 72")."""
    return answer.split("####")[-1].strip().replace(",", "")


def extract_number(completion: str) -> str | None:
    """The model's final answer: after "The answer is", else the last number in the text."""
    completion = completion.replace("\u2212", "-")
    match = re.search(r"[Tt]he (?:final )?answer is[:\s]*\$?(-?[\d,]*\.?\d+)", completion)
    if match:
        return match.group(1).replace(",", "")
    numbers = NUMBER.findall(completion)
    return numbers[-1].replace(",", "") if numbers else None


def numbers_equal(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = _to_number(predicted), _to_number(reference)
    return a is not None and b is not None and abs(a - b) < 1e-6


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    if not text.startswith("{", brace):  # "\\boxed 5": up to the closing $
        rest = text[start:].split("\\boxed ", 1)
        return rest[1].split("$")[0].strip() if len(rest) == 2 else None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


def extract_math_answer(completion: str) -> str | None:
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    match = re.search(r"[Tt]he (?:final )?answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", completion)
    return match.group(1).strip().strip("$") if match else None


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += f"{{{a}}}{{{b}}}{rest}" if b != "{" else f"{{{a}}}{b}{rest}"
    return out


def _fix_a_slash_b(s: str) -> str:
    match = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def normalize_math(s: str) -> str:
    """The MATH release's answer normalization (its ``strip_string``), for exact comparison."""
    s = s.replace("\n", "").replace("\\!", "").replace("\u2212", "-").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    if "\\text{ " in s:  # units after a value, as the release removes them: "5 \text{ cm}" → "5"
        s = s.split("\\text{ ")[0].strip() or s
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if "=" in s and len(s.split("=")[0]) <= 2:  # "x = 5" → "5"
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_a_slash_b(s)
    return s.rstrip(".")


def math_equal(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(reference)
    if not a or not b:  # an empty answer (\boxed{}) matches nothing
        return False
    if a == b:
        return True
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return abs(x - y) < 1e-6
    x, y = _value(a), _value(b)  # a fraction on one side at least: equal values only, not a rounded decimal
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)


FRACTION = re.compile(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}")


def _value(normalized: str) -> float | None:
    """The value of a normalized answer that is a number or a fraction of numbers ("-\\frac{1}{2}"), else None."""
    number = _to_number(normalized)
    if number is not None:
        return number
    match = FRACTION.fullmatch(normalized)
    if not match or float(match.group(3)) == 0:
        return None
    return (-1 if match.group(1) else 1) * float(match.group(2)) / float(match.group(3))


def extract_bbh_answer(completion: str) -> str:
    match = re.search(r"[Ss]o the answer is[:\s]*(.+?)(?:\.\s|\.?$|\n)", completion)
    answer = match.group(1) if match else completion.strip().split("\n")[0]
    return answer.strip().strip("*").strip().strip(".").strip().replace("\u2212", "-")


OPTION = re.compile(r"\(([A-R])\)")  # BBH's multiple-choice targets: "(A)" to "(R)"


def bbh_equal(predicted: str, reference: str) -> bool:
    def norm(s: str) -> str:
        return s.strip().strip("*").strip().strip(".").strip().lower()

    if norm(predicted) == norm(reference):
        return True
    option = OPTION.fullmatch(reference.strip())
    if option is None:
        return False
    # "A", "A)" or "(A) <the option's text>" name option (A); "A man ..." does not
    chosen = re.fullmatch(r"\(?([A-R])\)?|\(([A-R])\)\s.*", predicted.strip().strip("*").strip(), flags=re.DOTALL)
    return chosen is not None and (chosen.group(1) or chosen.group(2)) == option.group(1)
