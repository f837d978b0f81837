"""The Porter stemmer, equal to NLTK's `PorterStemmer()` (its default NLTK_EXTENSIONS mode).

    from lmforge.eval.porter import stem
    stem("running"), stem("generously"), stem("flies")      # ('run', 'gener', 'fli')

Google's `rouge-score` stems tokens with exactly that NLTK stemmer, so ROUGE with stemming needs it
bit for bit. The algorithm is Porter (1980), "An algorithm for suffix stripping", Program 14(3), with
Martin Porter's later fixes and the NLTK extensions (nltk/stem/porter.py), each marked below:
an irregular-forms table, words of 1-2 characters left alone, 'ies'/'ied' kept as 'ie' in 4-letter
words, Step 1c's 'y' -> 'i' only after a consonant, 'alli' tried first in Step 2, extra 'fulli' and
'logi' rules, and '*o' also true for a 2-letter vowel-consonant stem.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

VOWELS = frozenset("aeiou")

# NLTK extension: irregular forms that the rules get wrong, mapped straight to their stem.
IRREGULAR = {
    "skies": "sky", "sky": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}

Condition = Callable[[str], bool] | None
Rule = tuple[str, str, Condition]


def consonant_flags(word: str) -> list[bool]:
    """True where word[i] is a consonant: not a, e, i, o, u, and not a 'y' that follows a consonant."""
    flags: list[bool] = []
    for i, ch in enumerate(word):
        flags.append(ch not in VOWELS and (ch != "y" or i == 0 or not flags[i - 1]))
    return flags


def measure(stem: str) -> int:
    """Porter's m: the number of vowel-run -> consonant-run transitions in [C](VC){m}[V]."""
    cv = "".join("c" if c else "v" for c in consonant_flags(stem))
    return cv.count("vc")


def has_vowel(stem: str) -> bool:
    """Porter's *v*."""
    return not all(consonant_flags(stem))


def ends_double_consonant(word: str) -> bool:
    """Porter's *d: the word ends with two equal consonants."""
    return len(word) >= 2 and word[-1] == word[-2] and consonant_flags(word)[-1]


def ends_cvc(word: str) -> bool:
    """Porter's *o: ends consonant-vowel-consonant, the last not w, x or y (NLTK: or is a 2-letter vowel-consonant)."""
    f = consonant_flags(word)
    if len(word) >= 3:
        return f[-3] and not f[-2] and f[-1] and word[-1] not in "wxy"
    return len(word) == 2 and not f[0] and f[1]


def m_gt(k: int) -> Callable[[str], bool]:
    return lambda stem: measure(stem) > k


def apply_rules(word: str, rules: list[Rule]) -> str:
    """Apply the first rule whose suffix the word ends with; if its condition fails, stop (try no other rule).

    A rule is (suffix, replacement, condition on the stem left after removing the suffix). The suffix
    '*d' stands for "ends with a double consonant" (both letters removed); '' matches every word.
    """
    for suffix, replacement, condition in rules:
        if suffix == "*d":
            if not ends_double_consonant(word):
                continue
            stem = word[:-2]
        elif word.endswith(suffix):
            stem = word[: len(word) - len(suffix)]
        else:
            continue
        return stem + replacement if condition is None or condition(stem) else word
    return word


def step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:  # NLTK: 'dies' -> 'die' (but 'flies' -> 'fli')
        return word[:-3] + "ie"
    return apply_rules(word, [("sses", "ss", None), ("ies", "i", None), ("ss", "ss", None), ("s", "", None)])


def step1b(word: str) -> str:
    if word.endswith("ied"):  # NLTK: 'died' -> 'die', 'spied' -> 'spi'
        return word[:-3] + ("ie" if len(word) == 4 else "i")
    if word.endswith("eed"):
        return word[:-1] if measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and has_vowel(word[: -len(suffix)]):
            stem = word[: -len(suffix)]
            break
    else:
        return word
    # tidy the stem so 'ate', 'ble', 'ize' are recognized later; undouble; restore a silent 'e'
    return apply_rules(stem, [
        ("at", "ate", None), ("bl", "ble", None), ("iz", "ize", None),
        ("*d", stem[-1], lambda _: stem[-1] not in "lsz"),
        ("", "e", lambda s: measure(s) == 1 and ends_cvc(s)),
    ])


def step1c(word: str) -> str:
    # NLTK: y -> i only after a consonant that is not the whole stem ('happy' -> 'happi', 'enjoy' and 'by' kept)
    return apply_rules(word, [("y", "i", lambda s: len(s) > 1 and consonant_flags(s)[-1])])


STEP2 = [(s, r, m_gt(0)) for s, r in [
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"),  # Martin Porter's fix of the paper's 'abli' -> 'able'
    ("alli", "al"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"), ("ation", "ate"),
    ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"), ("ousness", "ous"),
    ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"),  # 'fulli': NLTK
]]


def step2(word: str) -> str:
    # NLTK: 'alli' -> 'al' first, then Step 2 again on the result
    if word.endswith("alli") and measure(word[:-4]) > 0:
        return step2(word[:-2])
    # NLTK: 'logi' -> 'log' with the 'l' counted in the stem, so 'geologi' works like 'archaeologi'
    return apply_rules(word, [*STEP2, ("logi", "log", lambda _: measure(word[:-3]) > 0)])


STEP3 = [(s, r, m_gt(0)) for s, r in [
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""), ("ness", "")]]

STEP4 = [(s, "", m_gt(1)) for s in ["al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent"]]
STEP4 += [("ion", "", lambda s: measure(s) > 1 and s[-1] in "st")]
STEP4 += [(s, "", m_gt(1)) for s in ["ou", "ism", "ate", "iti", "ous", "ive", "ize"]]


def step3(word: str) -> str:
    return apply_rules(word, STEP3)


def step4(word: str) -> str:
    return apply_rules(word, STEP4)


def step5a(word: str) -> str:
    # both rules share the suffix 'e', so the second is tried when the first's condition fails
    if word.endswith("e"):
        m = measure(word[:-1])
        if m > 1 or (m == 1 and not ends_cvc(word[:-1])):
            return word[:-1]
    return word


def step5b(word: str) -> str:
    return apply_rules(word, [("ll", "l", lambda _: measure(word[:-1]) > 1)])


@lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """The Porter stem of `word`, lowercased first, exactly as nltk's `PorterStemmer().stem(word)`."""
    lowered = word.lower()
    if lowered in IRREGULAR:
        return IRREGULAR[lowered]
    if len(word) <= 2:  # Martin Porter's versions leave 1-2 letter words alone
        return lowered
    for step in (step1a, step1b, step1c, step2, step3, step4, step5a, step5b):
        lowered = step(lowered)
    return lowered
