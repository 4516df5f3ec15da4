"""The tests on the real data and tokenizers in ../shared skip when either folder is missing, saying which and what to do."""

from helpers import shared_assets


def test_skipped_only_when_a_folder_is_missing_and_the_reason_names_it(tmp_path):
    (tmp_path / "data").mkdir()
    mark = shared_assets("the real-data tests", tmp_path)
    assert mark.args == (True,)
    reason = mark.kwargs["reason"]
    assert reason.startswith("the real-data tests need ")
    assert str(tmp_path / "tokenizers") in reason and str(tmp_path / "data") not in reason
    assert "beside the clone" in reason

    (tmp_path / "tokenizers").mkdir()
    assert shared_assets("the real-data tests", tmp_path).args == (False,)


def test_both_folders_named_when_both_are_missing(tmp_path):
    reason = shared_assets("the real-data tests", tmp_path).kwargs["reason"]
    assert f"{tmp_path / 'data'} and {tmp_path / 'tokenizers'}" in reason
