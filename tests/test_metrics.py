"""Answer scoring (tokenscale.workers.metrics): cases worked out by hand from the definitions
of the official VQA evaluation, ANLS, LLaVA's POPE script and MMBench's rule-based matcher."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenscale.workers.metrics import (
    METRICS,
    anls,
    exact_match,
    levenshtein,
    mmbench_option,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope_answer,
    pope_f1,
    pope_scores,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------
# VQA normalization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a dog.", "dog"),  # trailing period stripped, article dropped
        ("The Two dogs!", "2 dogs"),  # lowercase, number word, "!" spaced then collapsed
        ("an apple", "apple"),
        ("none", "0"),
        ("Ten", "10"),
        ("  a\tcat \n", "cat"),  # tab/newline to space, whitespace collapsed
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g. this", "eg this"),  # any other period goes
        ("10:30", "10:30"),  # ":" is not in the official punctuation list
        ("black/white", "black white"),  # mark touching no space: becomes a space
        ("black / white", "black white"),  # mark next to a space: deleted
        ("t-shirt", "t shirt"),
        ("yes, it is", "yes it is"),
        ("red,white", "red white"),
        ("1,000", "1000"),  # digit-comma-digit: every mark is deleted, not spaced
        ("(hello) [world]", "hello world"),
        ("dont", "don't"),
        ("Isnt it?", "isn't it"),
        ("whats", "what's"),
        ("youre", "you're"),
        ("don't", "don't"),  # "'" is not punctuation to the VQA eval
        ("Im", "im"),  # the table's capitalized keys never match after lowercasing
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


# ---------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------


def ten(matching: str, m: int, other: str = "3") -> list[str]:
    return [matching] * m + [other] * (10 - m)


def test_vqa_accuracy_three_matches():
    # leave-one-out over 10 annotators, three of whom said "2":
    #   dropping one of the 3 matching: 2 matches remain -> min(1, 2/3) = 2/3   (3 subsets)
    #   dropping one of the 7 others:   3 matches remain -> min(1, 3/3) = 1     (7 subsets)
    #   mean = (3 * 2/3 + 7 * 1) / 10 = 9/10
    assert vqa_accuracy("two", ten("2", 3)) == pytest.approx(0.9)


def test_vqa_accuracy_two_matches():
    # dropping a matching one: 1 match -> 1/3 (2 subsets); dropping another: 2 -> 2/3 (8)
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = 6/10
    assert vqa_accuracy("two", ten("2", 2)) == pytest.approx(0.6)


@pytest.mark.parametrize(("m", "expected"), [(0, 0.0), (1, 0.3), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_matches(m, expected):
    # m = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3; m = 4: every subset keeps >= 3 matches
    assert vqa_accuracy("2", ten("2", m)) == pytest.approx(expected)


def test_vqa_accuracy_normalizes_both_sides():
    assert vqa_accuracy("A dog.", ten("dog", 4, "cat")) == 1.0
    assert vqa_accuracy("dont", ten("Don't", 4, "yes")) == 1.0
    assert vqa_accuracy("The Two", ten("2", 4)) == 1.0
    assert vqa_accuracy("dogs", ten("dog", 10)) == 0.0  # no stemming


def test_vqa_accuracy_fewer_answers():
    # 3 answers ["yes", "yes", "no"], prediction "yes": dropping a "yes" leaves 1 match (1/3,
    # twice), dropping the "no" leaves 2 (2/3): mean = (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("Yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9)
    assert vqa_accuracy("yes", []) == 0.0


def test_exact_match():
    assert exact_match("The Two.", ["2"]) == 1.0
    assert exact_match("Left.", ["right", "left"]) == 1.0
    assert exact_match("3", ["2", "two"]) == 0.0
    assert exact_match("yes", []) == 0.0


# ---------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("ab", "ab", 0),
    ],
)
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d


def test_anls_exact_and_case():
    assert anls("hello world", ["hello world"]) == 1.0
    assert anls("  Hello   World ", ["hello world"]) == 1.0  # lowercased, stripped, collapsed
    assert anls("", [""]) == 1.0
    assert anls("x", []) == 0.0


def test_anls_typo():
    # one substitution in 11 characters
    assert anls("hell0 world", ["hello world"]) == pytest.approx(1 - 1 / 11)
    # best answer counts
    assert anls("hell0 world", ["goodbye", "hello world"]) == pytest.approx(1 - 1 / 11)


def test_anls_threshold_boundary():
    # d("abcd", "abxy") = 2 over 4: normalized distance exactly 0.5 keeps its 0.5
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)
    # d = 4 over 7 > 0.5: similarity 3/7 below the threshold scores 0
    assert anls("abcdefg", ["abcwxyz"]) == 0.0
    assert anls("abcdefg", ["abcwxyz"], threshold=0.4) == pytest.approx(3 / 7)
    assert anls("invoice", ["total"]) == 0.0


# ---------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes. No.", "yes"),  # only the first sentence counts
        ("Yes, there is a dog in the image.", "yes"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("no", "no"),
        ("yes", "yes"),
        ("Not really", "yes"),  # the reference checks "No", "not", "no" only
        ("Nothing like that", "yes"),  # whole words only
    ],
)
def test_pope_answer(reply, expected):
    assert pope_answer(reply) == expected


def test_pope_f1_by_hand():
    # TP = 3, FP = 1, TN = 4, FN = 2 (positive = "yes")
    predictions = ["Yes, it is.", "yes", "yes"] + ["yes"] + ["No."] * 4 + ["There is no cat."] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    scores = pope_scores(predictions, labels)
    assert pope_f1(predictions, labels) == pytest.approx(2 / 3)
    assert scores["accuracy"] == pytest.approx(7 / 10)
    assert scores["precision"] == pytest.approx(3 / 4)
    assert scores["recall"] == pytest.approx(3 / 5)
    # 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(4 / 10)


def test_pope_f1_degenerate_and_invalid():
    scores = pope_scores(["no", "no"], ["yes", "no"])
    assert scores == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        pope_f1(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_f1(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        pope_f1([], [])


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

OPTIONS = {"A": "a cat", "B": "a dog", "C": "a red bird", "D": "a fish"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("**B**", "B"),
        ("b", "B"),  # a reply that is only the letter
        ("B: a dog", "B"),
        ("Answer: C", "C"),
        ("The answer is B", "B"),
        ("The answer is A", "A"),  # "A" ending the reply is the option
        ("A", "A"),
        ("(A) It shows a cat", "A"),  # decorated "A" in a long reply
        ("B. A dog is there", "B"),  # two bare letters, one decorated
        ("a dog", "B"),  # the option's text
        ("A dog.", "B"),  # exactly option B's text, not the letter A
        ("The image shows a red bird.", "C"),  # contains exactly one option's text
        ("A fish swims in the bowl", "D"),  # article "A", then the text of D
        ("A bird sits on a branch", None),  # article "A" (> 3 words), no option's text
        ("A dog sits", "A"),  # the reference reads "A" as the option up to 3 words
        ("Is it A or B?", None),  # two letters, none decorated
        ("It is a dog, not a cat", None),  # two options' texts
        ("I don't know", None),
        ("", None),
    ],
)
def test_mmbench_option(reply, expected):
    assert mmbench_option(reply, OPTIONS) == expected


def test_mmbench_option_prefers_exact_text_and_skips_missing_options():
    options = {"A": "red", "B": "red and blue"}
    assert mmbench_option("Red and blue.", options) == "B"
    assert mmbench_option("It is red", options) == "A"
    # MMBench rows with fewer options carry None/NaN in the empty columns
    assert mmbench_option("nan", {"A": "cat", "B": "dog", "C": None, "D": float("nan")}) is None
    assert mmbench_option("E", {"A": "cat", "B": "dog"}) is None  # not one of the options


def test_multiple_choice_accuracy():
    predictions = ["B", "The answer is C", "a cat", "D"]
    assert multiple_choice_accuracy(predictions, [OPTIONS] * 4, ["B", "c", "A", "A"]) == 0.75
    with pytest.raises(ValueError):
        multiple_choice_accuracy(["B"], [OPTIONS, OPTIONS], ["B"])


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_metrics_registry():
    assert set(METRICS) == {"exact_match", "vqa_accuracy", "anls", "pope", "multiple_choice"}
    extra = {"question_id": 7, "question": "How many?"}  # other example fields are ignored
    assert METRICS["exact_match"]("Two", ["2"], **extra) == 1.0
    assert METRICS["vqa_accuracy"]("two", ten("2", 3), **extra) == pytest.approx(0.9)
    assert METRICS["anls"]("hell0 world", ["hello world"], **extra) == pytest.approx(10 / 11)
    assert METRICS["pope"]("No, there is not.", ["no"], **extra) == 1.0
    assert METRICS["pope"]("Yes. No.", ["No"], **extra) == 0.0
    assert METRICS["multiple_choice"]("(B)", ["B"], options=OPTIONS, **extra) == 1.0
    assert METRICS["multiple_choice"]("(B)", ["C"], options=OPTIONS) == 0.0
    with pytest.raises(ValueError):
        METRICS["multiple_choice"]("B", ["B"])  # no options


def test_import_is_light():
    code = (
        "import sys, tokenscale.workers.metrics\n"
        "heavy = [m for m in ('torch', 'numpy', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------------------------------------
# What an eval set declares: metric names and set-level scores
# ---------------------------------------------------------------------------------------------


def test_multiple_choice_by_letter_or_text():
    from tokenscale.workers.metrics import multiple_choice

    options = ["a cat", "a dog", "a bird"]
    assert multiple_choice("B", "B", options) == 1.0
    assert multiple_choice("(B) a dog", "a dog", options) == 1.0  # answer given as the option's text
    assert multiple_choice("The answer is C", "B", options) == 0.0
    assert multiple_choice("a dog.", "B", options) == 1.0
    with pytest.raises(ValueError):
        multiple_choice("B", "a fish", options)


def test_yes_no_and_pope_f1_as_the_set_score():
    from tokenscale.workers.metrics import score_set, yes_no

    assert yes_no("No, there is not.", "no") == 1.0 and yes_no("Yes. No.", "no") == 0.0
    predictions = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2  # TP 3, FP 1, TN 4, FN 2
    labels = [["yes"]] * 3 + [["no"]] + [["no"]] * 4 + [["yes"]] * 2
    score, accuracy = score_set("yes_no", predictions, labels)
    assert score == pytest.approx(2 / 3) and accuracy == pytest.approx(0.7)


def test_relaxed_accuracy_chartqa():
    from tokenscale.workers.metrics import relaxed_accuracy

    assert relaxed_accuracy("104", ["100"]) == 1.0  # within 5%
    assert relaxed_accuracy("106", ["100"]) == 0.0
    assert relaxed_accuracy("12%", ["12"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Blue.", ["blue"]) == 1.0 and relaxed_accuracy("red", ["blue"]) == 0.0


def test_score_set_means_and_names():
    from tokenscale.workers.metrics import SET_METRICS, score_set

    assert set(SET_METRICS) == {"vqa", "exact", "multiple_choice", "yes_no", "anls", "relaxed"}
    score, accuracy = score_set("vqa", ["two", "cat"], [["2"] * 10, ["dog"] * 10])
    assert score == accuracy == pytest.approx(0.5)
    score, _ = score_set("multiple_choice", ["A", "C"], [["A"], ["B"]], options=[["x", "y"], ["x", "y", "z"]])
    assert score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown metric"):
        score_set("bleu", ["a"], [["a"]])


def test_chance_floor_is_the_exact_one_sided_binomial_test():
    from math import comb

    from tokenscale.workers.metrics import chance_floor

    def tail(k: int, n: int, p: float) -> float:  # P(X >= k), summed by hand
        return sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k, n + 1))

    # 16 answers among 4 options: 11 correct has tail 0.000285 (<= 0.001), 10 has 0.00164
    assert chance_floor(16, 0.25, 0.001) == 11
    assert tail(11, 16, 0.25) <= 0.001 < tail(10, 16, 0.25)
    for n, p, alpha in [(64, 0.25, 0.001), (128, 1 / 6, 0.001), (200, 0.1, 0.01), (30, 0.5, 0.05)]:
        k = chance_floor(n, p, alpha)
        assert tail(k, n, p) <= alpha < tail(k - 1, n, p), (n, p, alpha)
    assert chance_floor(8, 0.5, 0.001) == 9  # 8/8 has tail 0.0039: too few answers to tell
    assert chance_floor(10, 0.0) == 1
    with pytest.raises(ValueError, match="chance in"):
        chance_floor(10, 1.5)
