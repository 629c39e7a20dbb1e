"""JSON Lines are read by one helper (shared.jsonl.json_lines): every JSONL reader reports a bad
line the same way, naming the file, the line and the column."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from shared.data.amazon import read_reviews
from shared.data.importers import import_jsonl
from shared.jsonl import json_lines
from shared.tasks import get_task

REVIEW = {"reviewerID": "r1", "asin": "a1", "reviewText": "fine strings", "overall": 5.0, "summary": "ok",
          "unixReviewTime": 1393632000}


def test_values_with_their_line_numbers_blank_lines_skipped():
    assert list(json_lines(['{"a": 1}', "", "  ", "[2]", "3"], "f")) == [(1, {"a": 1}), (4, [2]), (5, 3)]


def test_a_bad_line_names_the_source_line_and_column():
    with pytest.raises(ValueError, match=r"^in\.jsonl: line 3: not valid JSON \(Expecting value, column 7\)$"):
        list(json_lines(['{"a": 1}', "", '{"b": }'], "in.jsonl"))


def test_amazon_reviews_and_jsonl_imports_say_it_alike(tmp_path):
    reviews = tmp_path / "reviews.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(REVIEW) + "\n" + '{"reviewerID": "r2",\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(reviews))}: line 2: not valid JSON \(Expecting property name "
                                         r"enclosed in double quotes, column 21\)$"):
        read_reviews(reviews)
    flat = tmp_path / "in.jsonl"
    flat.write_text('{"text": "ok", "score": 5}\n{"text": "ok",\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(flat))}: line 2: not valid JSON \(Expecting property name "
                                         r"enclosed in double quotes, column 15\)$"):
        import_jsonl(flat, get_task("amazon-rating"))
