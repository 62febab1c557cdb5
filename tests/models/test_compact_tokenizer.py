"""The compact family's tokenizer is one tokenizer: built in any process it has the same vocabulary and merges
(tokenizers' own BPE trainer broke ties by hash-map order, so `-w tiny` was a different model per process), and
it keeps the words it was built for whole."""

from __future__ import annotations

import subprocess
import sys

from digseg_cli.models.compact import VOCABULARY, build_tokenizer, learn_merges

FINGERPRINT = """
import hashlib, json
from digseg_cli.models.compact import build_tokenizer
t = build_tokenizer()
words = ["rider", "traffic light", "sidewalk", "motorcycle", "road"]
print(hashlib.sha256(json.dumps([sorted(t.get_vocab().items()), t(words).input_ids]).encode()).hexdigest())
"""


def test_the_tokenizer_is_the_same_in_every_process():
    runs = {subprocess.run([sys.executable, "-c", FINGERPRINT], capture_output=True, text=True, check=True).stdout
            for _ in range(3)}  # fmt: skip
    assert len(runs) == 1, runs  # before the fix, four processes built three different tokenizers


def test_the_vocabulary_tokenizes_whole_and_other_text_by_bytes():
    tokenizer = build_tokenizer()
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    ids = tokenizer("zebra", add_special_tokens=False).input_ids
    assert "".join(tokenizer.convert_ids_to_tokens(ids)) == "zebra</w>" and len(ids) > 1


def test_merges_take_the_most_frequent_pair_and_break_ties_by_the_pair():
    # "ab" twice beats everything; then "ab"+"c</w>" and "ab"+"d</w>" tie once each: the smaller pair first.
    assert learn_merges(["abd", "abc"]) == [("a", "b"), ("ab", "c</w>"), ("ab", "d</w>")]
    assert learn_merges(["abc", "abd"]) == learn_merges(["abd", "abc", "abd"])  # order and repeats do not matter
    assert learn_merges(VOCABULARY) == learn_merges(list(reversed(VOCABULARY)))
