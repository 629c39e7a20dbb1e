"""A person's own data as history items: JSONL and CSV with a field mapping (errors name the file,
line and field), the commit history of a git repository filtered to one author (this repository's
own history, and a small one with a merge), and the history file `oppu client add` reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shared.data.importers import (
    content_id, import_csv, import_git, import_jsonl, parse_mapping, split_message, write_history,
)
from shared.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
RATING, COMMITS = get_task("amazon-rating"), get_task("commit-title")


def _daemon_reads(path: Path, task) -> list:
    """What `oppu client add` sends and the daemon stores (client/input_files.py, client/items.py)."""
    from client.input_files import read_items
    from client.items import parse_items

    return parse_items(read_items(str(path)), task, max_field_chars=20000)


def test_jsonl_with_a_mapping_becomes_checked_items_the_daemon_adds(tmp_path):
    src = tmp_path / "reviews.jsonl"
    src.write_text("\n".join([
        json.dumps({"review_id": "r2", "body": "Stays in tune.", "stars": 5.0, "date": "2024-03-01"}),
        "",
        json.dumps({"review_id": "r1", "body": "Buzzes on the low E.", "stars": 2, "date": "2023-12-24"}),
        json.dumps({"body": "No id here.", "stars": "4", "date": 7}),
        json.dumps({"review_id": "r1", "body": "Buzzes on the low E.", "stars": 2, "date": "2023-12-24"}),
    ]) + "\n")
    mapping = parse_mapping(["text=body", "score=stars", "id=review_id"], RATING)
    result = import_jsonl(src, RATING, mapping)
    assert [(it.id, dict(it.fields), it.time) for it in result.items] == [
        (content_id({"text": "No id here.", "score": "4"}), {"text": "No id here.", "score": "4"}, 7),
        ("r1", {"text": "Buzzes on the low E.", "score": "2"}, 1703376000),
        ("r2", {"text": "Stays in tune.", "score": "5"}, 1709251200),
    ]
    assert dict(result.skipped) == {"repeated": 1}
    out = write_history(tmp_path / "out" / "history.jsonl", result.items)
    assert [(it.id, dict(it.fields), it.time) for it in _daemon_reads(out, RATING)] == \
        [(it.id, dict(it.fields), it.time) for it in result.items]
    assert [p.name for p in out.parent.iterdir()] == ["history.jsonl"]  # no temporary file left


@pytest.mark.parametrize("lines, mapping, message", [
    ([{"body": "ok", "stars": 5}, {"body": "", "stars": 3}], ["text=body", "score=stars"],
     "line 2: field 'text' (from column 'body') is missing or empty; amazon-rating items need text, score; "
     "this record's columns: body, stars"),
    ([{"text": "ok", "score": 5, "url": "http://x"}], [],
     "line 1: column 'url' is not a field of task amazon-rating (text, score); map it with --map FIELD=url, "
     "or leave it out with --ignore url"),
    ([{"text": "ok", "score": 6}], [], "line 1: item '"),
    ([{"text": "ok", "score": [5]}], [], "line 1: column 'score': [5] must be text or a number"),
    ([{"id": "a", "text": "ok", "score": 5}, {"id": "a", "text": "other", "score": 5}], [],
     "line 2: id 'a' was already used by {src}: line 1 for different content; ids must be unique"),
    ([{"text": "ok", "score": 5, "date": "soon"}], [], "line 1: field 'date' 'soon' is neither an integer nor an ISO date"),
])
def test_jsonl_errors_name_the_line_and_the_field(tmp_path, lines, mapping, message):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError) as err:
        import_jsonl(src, RATING, parse_mapping(mapping, RATING))
    assert str(err.value).startswith(f"{src}: " + message.format(src=src))
    if "score\": 6" in json.dumps(lines):
        assert str(err.value).endswith("field 'score': rating '6' is not a whole number 1-5")


def test_jsonl_refuses_broken_lines_and_the_ignore_option_leaves_a_column_out(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "ok", "score": 5, "url": "u"}\n{"text": "ok",\n')
    with pytest.raises(ValueError, match=r"in.jsonl: line 2: not valid JSON \(Expecting property name"):
        import_jsonl(src, RATING, ignore=["url"])
    src.write_text('{"text": "ok", "score": 5, "url": "u"}\n')
    assert [dict(i.fields) for i in import_jsonl(src, RATING, ignore=["url"]).items] == [{"text": "ok", "score": "5"}]


def test_a_mapping_names_task_fields_only():
    with pytest.raises(ValueError) as err:
        parse_mapping(["txt=body"], RATING)
    assert str(err.value) == "--map 'txt=body': 'txt' is not a field of task amazon-rating; fields: text, score, id, time"
    with pytest.raises(ValueError, match=r"--map 'text' must look like FIELD=COLUMN, e.g. --map text=body"):
        parse_mapping(["text"], RATING)


def test_csv_with_a_mapping_and_errors_with_line_numbers(tmp_path):
    src = tmp_path / "reviews.csv"
    src.write_text('\ufeffid,review,rating,when\n'
                   'a,"Two lines,\nof review",4,2024-01-02\n'
                   '\n'
                   'b,Short,5.0,2024-01-03\n', newline="")
    result = import_csv(src, RATING, parse_mapping(["text=review", "score=rating", "time=when"], RATING))
    # The rating is stored in the task's spelling ('5.0' -> '5'), as the daemon stores it.
    assert [(i.id, dict(i.fields)) for i in result.items] == [
        ("a", {"text": "Two lines,\nof review", "score": "4"}), ("b", {"text": "Short", "score": "5"})]
    assert [i.time for i in result.items] == [1704153600, 1704240000]
    assert RATING.item_target(result.items[1]) == "5"

    with pytest.raises(ValueError) as err:
        import_csv(src, RATING, parse_mapping(["text=body", "score=rating"], RATING))
    assert str(err.value) == (f"{src}: line 1 (header): no column 'body' for field 'text' (--map text=body); "
                              "columns: id, review, rating, when")
    src.write_text('text,score\nfine,5\n"multi\nline",9\nthree,4,extra\n')
    with pytest.raises(ValueError) as err:
        import_csv(src, RATING)
    assert str(err.value) == f"{src}: line 3: item '{content_id({'text': 'multi' + chr(10) + 'line', 'score': '9'})}' " \
        "field 'score': rating '9' is not a whole number 1-5"
    src.write_text('text,score\nfine,5\nthree,4,extra\n')
    with pytest.raises(ValueError) as err:
        import_csv(src, RATING)
    assert str(err.value) == f"{src}: line 3: 3 values but the header names 2 columns"
    src.write_text('text,text\n')
    with pytest.raises(ValueError, match=r"line 1 \(header\): column names must be distinct and non-empty"):
        import_csv(src, RATING)
    with pytest.raises(ValueError, match=r"cannot be read \(Is a directory\)"):
        import_csv(tmp_path, RATING)


# -- git ------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _has_history(repo: Path) -> bool:
    return shutil.which("git") is not None and (repo / ".git").exists() and \
        int(_git(repo, "rev-list", "--count", "HEAD").strip() or 0) > 10


@pytest.mark.skipif(not _has_history(REPO), reason="needs this repository's git history")
def test_git_import_of_this_repositorys_own_history():
    # The author with the most commits that have a body; git's own split of subject and body is the oracle.
    log = _git(REPO, "log", "--no-merges", "-z", "--format=%H%x1f%an%x1f%ae%x1f%s%x1f%b")
    commits = [r.split("\x1f") for r in log.split("\x00") if r.strip()]
    with_body = [c for c in commits if c[4].strip()]
    assert with_body, "this repository has no commit with a body"
    name = max({c[1] for c in with_body}, key=lambda n: sum(c[1] == n for c in with_body))
    mine = {c[0]: c for c in with_body if c[1] == name}

    result = import_git(REPO, name.upper(), COMMITS)
    assert {it.id for it in result.items} == set(mine)
    for it in result.items:
        _, _, _, subject, body = mine[it.id]
        assert it.fields == {"body": body.strip(), "subject": subject}
        assert COMMITS.item_to_example(it) == (COMMITS.make_input(it), subject)
        assert COMMITS.make_input(it).endswith(body.strip())
    assert [it.time for it in result.items] == sorted(it.time for it in result.items)
    merges = set(_git(REPO, "rev-list", "--merges", "HEAD").split())
    assert not merges & {it.id for it in result.items}
    assert result.skipped["merges"] == sum(1 for m in merges if _git(REPO, "log", "-1", "--format=%an", m).strip() == name)
    by_name = sum(1 for c in commits if c[1] == name)
    assert result.skipped["without a body"] == by_name - len(mine)
    # the same author by email finds the same commits; an unknown author is told who is there
    email = next(iter(mine.values()))[2]
    assert [it.id for it in import_git(REPO, email, COMMITS).items] == [it.id for it in result.items]
    with pytest.raises(ValueError) as err:
        import_git(REPO, "Nobody Here", COMMITS)
    assert str(err.value).startswith(f"{REPO}: no commit by 'Nobody Here' (author name or email, any case); authors: ")
    assert name in str(err.value)


def test_git_import_skips_merges_empty_bodies_trailers_and_other_authors(tmp_path):
    repo = tmp_path / "repo"
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str, who: str = "Ada Lovelace", when: int = 1700000000) -> None:
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env={
            **env, "GIT_AUTHOR_NAME": who, "GIT_AUTHOR_EMAIL": f"{who.split()[0].lower()}@example.org",
            "GIT_COMMITTER_NAME": who, "GIT_COMMITTER_EMAIL": "c@example.org",
            "GIT_AUTHOR_DATE": f"{when} +0000", "GIT_COMMITTER_DATE": f"{when} +0000"})

    repo.mkdir()
    git("init", "-q", "-b", "main")
    git("commit", "-q", "--allow-empty", "-m", "engine: first subject\n\nWhy the engine changed,\nin two lines.",
        when=1700000001)
    git("commit", "-q", "--allow-empty", "-m", "only a subject", when=1700000002)
    git("checkout", "-q", "-b", "side")
    git("commit", "-q", "--allow-empty", "-m", "side: a change\n\nIts body.\n\nSigned-off-by: Ada <ada@example.org>",
        when=1700000003)
    git("commit", "-q", "--allow-empty", "-m", "by someone else\n\nTheir body.", who="Bob Builder", when=1700000004)
    git("checkout", "-q", "main")
    git("commit", "-q", "--allow-empty", "-m", "main moves on\n\nA body on main.", when=1700000005)
    git("merge", "-q", "--no-ff", "side", "-m", "Merge side\n\nA merge with a body of its own.", when=1700000006)
    git("commit", "-q", "--allow-empty", "-m", "trailers only\n\nSigned-off-by: Ada <ada@example.org>", when=1700000007)

    result = import_git(repo, "ada@example.org", COMMITS)
    assert [dict(it.fields) for it in result.items] == [
        {"subject": "engine: first subject", "body": "Why the engine changed,\nin two lines."},
        {"subject": "side: a change", "body": "Its body."},
        {"subject": "main moves on", "body": "A body on main."},
    ]
    assert [it.time for it in result.items] == [1700000001, 1700000003, 1700000005]
    assert dict(result.skipped) == {"merges": 1, "without a body": 2, "by other authors": 1}
    assert [it.fields["subject"] for it in import_git(repo, "Ada Lovelace", COMMITS, max_count=2).items] == \
        ["side: a change", "main moves on"]
    with pytest.raises(ValueError, match=r"repo: git log nope failed: .*nope"):
        import_git(repo, "Ada Lovelace", COMMITS, rev="nope")
    with pytest.raises(ValueError, match=r"not a git repository"):
        import_git(tmp_path, "Ada Lovelace", COMMITS)
    with pytest.raises(ValueError, match=r"--rev '--output=x' must name a revision \(a branch, tag or commit\), not an option"):
        import_git(repo, "Ada Lovelace", COMMITS, rev="--output=x")
    assert not (repo / "x").exists()


def test_split_message_reads_subject_and_body_as_git_does():
    assert split_message("  A subject\nwrapped\n\n\nBody one.\n \nBody two.\n\nAcked-by: X <x@y>\n") == \
        ("A subject wrapped", "Body one.\n\nBody two.")
    assert split_message("subject only\n") == ("subject only", "")


def test_oppu_import_writes_a_history_file(tmp_path, capsys, monkeypatch):
    from oppu.cli import main

    monkeypatch.setenv("OPPU_CLIENT_DIR", str(tmp_path))  # no daemon.toml with tasks of its own

    src = tmp_path / "notes.csv"
    src.write_text("body,stars,url\nGood,5,u1\nBad,1,u2\n")
    out = tmp_path / "history.jsonl"
    assert main(["import", "csv", str(src), "--task", "amazon-rating", "--map", "text=body", "--map", "score=stars",
                 "--ignore", "url", "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 2 items of task amazon-rating to {out}\n")
    assert [dict(i.fields) for i in _daemon_reads(out, RATING)] == [{"text": "Good", "score": "5"},
                                                                     {"text": "Bad", "score": "1"}]
    assert main(["import", "csv", str(src), "--task", "amazon-rating", "-o", str(tmp_path / "no.jsonl")]) == 2
    assert "line 1 (header): no column 'text' for field 'text'; columns: body, stars, url" in capsys.readouterr().err
    assert not (tmp_path / "no.jsonl").exists()
