"""Checkpoint pruning on folders made on disk: a partial folder of a failed attempt never displaces a published one."""
import json

from dynbatch_core.engine.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint


def make_folder(root, step, complete=True):
    """A checkpoint folder, with its state file or (a failed attempt's partial folder) without."""
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "state.pt").write_bytes(b"checkpoint")
    return folder.name


def folders(root):
    return sorted(p.name for p in root.glob("step-*"))


def test_a_newer_partial_folder_does_not_displace_the_two_published_checkpoints(tmp_path):
    published = [make_folder(tmp_path, 10), make_folder(tmp_path, 20)]
    make_folder(tmp_path, 30)  # a failed attempt wrote it, then died before publishing it
    prune_checkpoints(tmp_path, published, keep=2)
    # keeping the two highest-numbered folders would have deleted step 10 and kept the partial one
    assert folders(tmp_path) == ["step-00000010", "step-00000020", "step-00000030"]


def test_older_checkpoints_and_older_partial_folders_go_once_a_newer_one_is_published(tmp_path):
    published = [make_folder(tmp_path, 10), make_folder(tmp_path, 20), make_folder(tmp_path, 40)]
    make_folder(tmp_path, 30, complete=False)   # partial, older than the newest published: deleted
    make_folder(tmp_path, 50, complete=False)   # partial, newer: left for the run to overwrite
    prune_checkpoints(tmp_path, published, keep=2)
    assert folders(tmp_path) == ["step-00000020", "step-00000040", "step-00000050"]


def test_save_checkpoint_records_the_published_folders_and_prunes_by_them(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        save_checkpoint(tmp_path, step=step, world_size=1, state={})
    make_folder(root, 30, complete=False)  # a failed attempt created the folder, then died before writing
    save_checkpoint(tmp_path, step=25, world_size=1, state={})  # resumed from 20, checkpointing more often
    assert folders(root) == ["step-00000020", "step-00000025", "step-00000030"]
    assert json.loads((root / "latest.json").read_text())["published"] == ["step-00000020", "step-00000025"]
    assert latest_checkpoint(tmp_path)[0].name == "step-00000025"
    save_checkpoint(tmp_path, step=35, world_size=1, state={})
    assert folders(root) == ["step-00000025", "step-00000035"]


def test_a_pointer_written_before_the_published_list_counts_its_folder_as_published(tmp_path):
    root = tmp_path / "checkpoints"
    make_folder(root, 10)
    make_folder(root, 15, complete=False)  # partial
    (root / "latest.json").write_text(json.dumps({"folder": "step-00000010", "step": 10, "world_size": 2}))
    save_checkpoint(tmp_path, step=20, world_size=1, state={})
    assert folders(root) == ["step-00000010", "step-00000020"]
    assert json.loads((root / "latest.json").read_text())["published"] == ["step-00000010", "step-00000020"]
