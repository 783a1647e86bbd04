"""The write order of every command (nsr_hf/run_folder.py): results appear whole or not at all, and replace earlier ones
only after the new ones exist."""
import pytest

from nsr_hf.errors import UserError
from nsr_hf.run_folder import (
    FinishedStages,
    refuse_finished,
    remove_leftovers,
    replace_folder,
    restore_interrupted_swap,
    work_folder,
    write_text_atomically,
    written_atomically,
)
from nsr_hf.utils import write_json


def _folder(path, text="old"):
    path.mkdir(parents=True)
    (path / "result.txt").write_text(text)
    return path


def test_a_successful_block_replaces_the_folder_with_what_it_wrote(tmp_path):
    out = _folder(tmp_path / "out")
    with written_atomically(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "result.txt").write_text("new")
    assert (out / "result.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left behind


def test_a_failing_block_leaves_the_old_folder_byte_identical_and_no_temporary_folder(tmp_path):
    out = _folder(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"):
        with written_atomically(out) as tmp:
            (tmp / "result.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "result.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interruption_leaves_the_old_folder(tmp_path):
    out = _folder(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        with written_atomically(out):
            raise KeyboardInterrupt
    assert (out / "result.txt").read_text() == "old"


def test_keep_on_error_keeps_the_partial_work_beside_the_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with written_atomically(tmp_path / "out", keep_on_error=True) as tmp:
            (tmp / "part").write_text("x")
            raise RuntimeError
    assert (tmp / "part").exists() and not (tmp_path / "out").exists()


def test_a_crash_in_the_middle_of_a_swap_is_undone_on_the_next_call(tmp_path):
    out = _folder(tmp_path / "out")
    (tmp_path / "out").rename(tmp_path / ".old-out-abc")  # the old folder moved aside, the new one never arrived
    restore_interrupted_swap(out)
    assert (out / "result.txt").read_text() == "old"


def test_replace_folder_into_a_missing_folder(tmp_path):
    new = _folder(tmp_path / ".tmp-out-1", "new")
    replace_folder(new, tmp_path / "out")
    assert (tmp_path / "out" / "result.txt").read_text() == "new" and not new.exists()


def test_refuse_finished_allows_a_new_or_empty_folder(tmp_path):
    refuse_finished(tmp_path / "missing", "a scan", finished=False, overwrite=False)
    (tmp_path / "empty").mkdir()
    refuse_finished(tmp_path / "empty", "a scan", finished=False, overwrite=False)


def test_refuse_finished_refuses_finished_results_without_overwrite_and_names_the_fix(tmp_path):
    out = _folder(tmp_path / "out")
    with pytest.raises(UserError, match="already holds a scan that finished. Nothing was changed.*--overwrite"):
        refuse_finished(out, "a scan", finished=True, overwrite=False)
    refuse_finished(out, "a scan", finished=True, overwrite=True)


def test_refuse_finished_never_replaces_a_folder_of_other_files_even_with_overwrite(tmp_path):
    out = _folder(tmp_path / "work")
    with pytest.raises(UserError, match="holds files that are not a scan"):
        refuse_finished(out, "a scan", finished=False, overwrite=True)


def test_refuse_finished_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        refuse_finished(tmp_path / "f", "a scan", finished=False, overwrite=True)


def test_write_json_replaces_the_file_whole(tmp_path):
    path = write_json(tmp_path / "sub" / "metrics.json", {"a": 1})
    write_json(path, {"a": 2})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]
    write_text_atomically(tmp_path / "t.txt", "hello")
    assert (tmp_path / "t.txt").read_text() == "hello"


def test_refuse_finished_refuses_a_folder_of_other_files_without_overwrite_too(tmp_path):
    out = _folder(tmp_path / "work")
    with pytest.raises(UserError, match="holds files that are not a scan: choose a new or empty output_dir.*Nothing was changed"):
        refuse_finished(out, "a scan", finished=False, overwrite=False)


def test_refuse_finished_never_takes_the_current_folder_even_when_empty(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for folder in (".", "..", str(tmp_path / "here")):
        with pytest.raises(UserError, match="is the current folder or holds it"):
            refuse_finished(folder, "a scan", finished=True, overwrite=True)


def test_work_folder_is_a_fixed_hidden_sibling(tmp_path):
    assert work_folder(tmp_path / "ds", "overwrite") == tmp_path / ".tmp-ds-overwrite"


def test_finished_stages_are_read_back_by_a_rerun_with_the_same_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"values": [1.5, 2.5]}

    assert FinishedStages(tmp_path / "out", "key-1").get("predictions", compute) == {"values": [1.5, 2.5]}
    rerun = FinishedStages(tmp_path / "out", "key-1")
    assert rerun.get("predictions", compute) == {"values": [1.5, 2.5]} and len(calls) == 1 and rerun.resumed == ["predictions"]
    rerun.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_finished_stages_of_another_key_are_dropped(tmp_path):
    FinishedStages(tmp_path / "out", "key-1").get("predictions", lambda: 1)
    other = FinishedStages(tmp_path / "out", "key-2")
    assert other.get("predictions", lambda: 2) == 2 and other.resumed == []


def test_without_a_key_no_stage_is_kept(tmp_path):
    stages = FinishedStages(tmp_path / "out", None)
    assert stages.get("predictions", lambda: 3) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_successful_write_removes_what_killed_writes_of_the_same_folder_left_beside_it(tmp_path):
    out = _folder(tmp_path / "out")
    for name in (".tmp-out-ab12cd_3", ".old-out-zz99yy00", ".tmp-out-stages", ".tmp-out-overwrite", ".tmp-other-ab12cd34"):
        (tmp_path / name).mkdir()
    with written_atomically(out) as tmp:
        (tmp / "result.txt").write_text("new")
    # kept: the work folders a rerun resumes from, and another folder's temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other-ab12cd34", ".tmp-out-overwrite", ".tmp-out-stages", "out"]
    remove_leftovers(out)  # nothing more to remove
    assert (out / "result.txt").read_text() == "new"
