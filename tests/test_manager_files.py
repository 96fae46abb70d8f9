"""What the manager makes of a message's document or photo before fetching it."""

from __future__ import annotations

from codexnet.manager.files import attachment_of, refusal


def test_the_largest_photo_size_is_taken() -> None:
    message = {
        "photo": [
            {"file_id": "small", "width": 90, "height": 60, "file_size": 1000},
            {"file_id": "large", "width": 1280, "height": 853, "file_size": 90000},
        ]
    }
    attachment = attachment_of(message)
    assert attachment is not None
    assert (attachment.kind, attachment.file_id, attachment.size) == ("photo", "large", 90000)
    assert refusal(attachment) is None


def test_a_file_without_an_announced_size_is_fetched_not_called_empty() -> None:
    # file_size is optional in the Bot API: only the download can tell.
    for message in (
        {"document": {"file_id": "d", "file_name": "a.txt"}},
        {"photo": [{"file_id": "p"}]},
    ):
        attachment = attachment_of(message)
        assert attachment is not None
        assert refusal(attachment) is None


def test_an_empty_or_too_big_file_is_refused_in_one_line() -> None:
    empty = attachment_of({"document": {"file_id": "d", "file_name": "e.txt", "file_size": 0}})
    big = attachment_of({"document": {"file_id": "d", "file_name": "b.bin", "file_size": 21 << 20}})
    assert empty is not None
    assert big is not None
    assert refusal(empty) == "e.txt is empty; nothing was run."
    assert refusal(big) == (
        "b.bin is 21.0 MB; Telegram lets bots fetch files of up to 20 MB, so nothing was run."
    )
    assert attachment_of({"text": "hi"}) is None
