"""Our Porter stemmer equals NLTK's `PorterStemmer()` (NLTK_EXTENSIONS mode) word for word.

Words: every alphabetic token of the Python standard library's own source (always present, ~22k distinct),
plus generated words that end in each suffix the rules know, random strings rich in 'y' and vowels, and
hand-written edge cases. nltk is a test reference only.
"""

import random
import re
import sysconfig
from pathlib import Path

import pytest

from lmforge.eval.porter import measure, stem

porter = pytest.importorskip("nltk.stem.porter")

SUFFIXES = ["s", "es", "sses", "ies", "ss", "ied", "eed", "ed", "ing", "y", "ational", "tional", "enci", "anci",
            "izer", "bli", "abli", "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism", "iveness",
            "fulness", "ousness", "aliti", "iviti", "biliti", "fulli", "logi", "logy", "icate", "ative", "alize",
            "iciti", "ical", "ful", "ness", "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement",
            "ment", "ent", "sion", "tion", "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize", "e", "ll", "lled",
            "ating", "bled", "izing", "ying", "ies", "fully", "ally", "ously", "ently"]
STEMS = ["", "a", "b", "y", "ab", "ay", "by", "sy", "ow", "tr", "tree", "oat", "conflat", "troubl", "hopp", "tann",
         "fall", "hiss", "fizz", "fail", "fil", "sky", "happ", "enjoy", "relat", "condit", "valen", "hesit",
         "digit", "conform", "radic", "differ", "vil", "analog", "vietnam", "predic", "oper", "feud", "decis",
         "hope", "callous", "formal", "sensit", "sensib", "electr", "good", "reviv", "allow", "infer", "airlin",
         "gyroscop", "adjust", "defens", "irrit", "replac", "depend", "adopt", "homolog", "commun", "activ",
         "angular", "effect", "bowdler", "prob", "rat", "ceas", "controll", "roll", "geo", "theo", "archaeo",
         "syzyg", "toy", "ivy", "orrer", "xyz", "quiz", "box", "saw", "play", "die", "ly", "sp", "fl", "cr"]
EDGE_CASES = ["", "a", "is", "as", "us", "yes", "ies", "dies", "lies", "ties", "flies", "died", "lied", "tied",
              "spied", "skies", "sky", "dying", "lying", "tying", "news", "innings", "inning", "outings", "outing",
              "cannings", "canning", "howe", "proceed", "exceed", "succeed", "feed", "agreed", "bled", "sing",
              "motoring", "plastered", "caresses", "ponies", "caress", "cats", "happy", "enjoy", "spy", "fly",
              "try", "by", "generously", "generalization", "oscillators", "controlling", "rolling", "probate",
              "rate", "cease", "geology", "theology", "archaeology", "yyyyyyyy", "yayayaya", "ayyyy", "syzygy",
              "RUNNING", "Running", "Flies", "İstanbul", "a1b2c3ing", "1234", "2020s", "0ed", "x9ies",
              "y" * 2000, "ab" * 500 + "ational"]


def standard_library_words() -> set[str]:
    """Distinct lowercase alphabetic tokens of the stdlib's source (tests and IDLE skipped to keep it quick)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    words: set[bytes] = set()
    pattern = re.compile(rb"[a-z]+")
    for path in root.glob("**/*.py"):
        if not {"site-packages", "test", "tests", "idlelib"} & set(path.parts):
            words.update(pattern.findall(path.read_bytes().lower()))
    return {w.decode() for w in words}


def generated_words(n_random: int = 4000) -> set[str]:
    rng = random.Random(0)
    words = {s + x for s in STEMS for x in SUFFIXES}
    alphabet = "aeiouyybcdlmnrstzw"
    words |= {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n_random)}
    return words


def test_equals_nltk_on_a_large_word_list():
    words = sorted(standard_library_words() | generated_words() | set(EDGE_CASES))
    assert len(words) >= 20_000, len(words)
    reference = porter.PorterStemmer()
    wrong = [(w, stem(w), reference.stem(w)) for w in words if stem(w) != reference.stem(w)]
    assert not wrong, f"{len(wrong)} of {len(words)} differ, e.g. {wrong[:10]}"


@pytest.mark.parametrize("word, expected", [
    ("caresses", "caress"), ("ponies", "poni"), ("dies", "die"), ("flies", "fli"), ("agreed", "agre"),
    ("hopping", "hop"), ("filing", "file"), ("happy", "happi"), ("enjoy", "enjoy"), ("relational", "relat"),
    ("generalization", "gener"), ("dying", "die"), ("Running", "run"), ("controlling", "control"),
])
def test_known_stems(word, expected):
    assert stem(word) == expected


def test_measure_matches_the_paper_examples():
    # Porter (1980): m=0 TR, EE, TREE, Y, BY; m=1 TROUBLE, OATS, TREES, IVY; m=2 TROUBLES, PRIVATE, OATEN, ORRERY
    assert [measure(w) for w in ["tr", "ee", "tree", "y", "by"]] == [0] * 5
    assert [measure(w) for w in ["trouble", "oats", "trees", "ivy"]] == [1] * 4
    assert [measure(w) for w in ["troubles", "private", "oaten", "orrery"]] == [2] * 4
