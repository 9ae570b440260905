"""Hub ids and pinned revisions, resolved through huggingface_hub against a fake local cache laid out as
huggingface_hub lays it out (models--org--name/{refs/<branch>, snapshots/<commit>/...}), offline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from polytool.cli import main
from polytool.formats.base import resolve_base_dir
from polytool.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MAIN, OLD = "a" * 40, "0123456789abcdef0123456789abcdef01234567"
MISSING = "deadbeef" * 5


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def add_repo(hub: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """models--org--name with one snapshot per commit (files copied from a directory) and refs naming them."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    for commit, source in snapshots.items():
        shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (folder / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """org/tiny: main -> MAIN, v1 -> OLD (OLD's config marked); org/poly-adapter: the mhr fixture naming org/tiny."""
    old = tmp_path / "old-base"
    shutil.copytree(FIXTURES / "tiny-llama", old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "polytool_test_snapshot": "old"}))
    adapter = tmp_path / "adapter-src"
    shutil.copytree(FIXTURES / "mhr", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/tiny"}))
    cache = tmp_path / "hub"
    add_repo(cache, "org/tiny", {MAIN: FIXTURES / "tiny-llama", OLD: old}, {"main": MAIN, "v1": OLD})
    add_repo(cache, "org/poly-adapter", {MAIN: adapter}, {"main": MAIN})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def pinned(tmp_path: Path, revision: str | None) -> Path:
    """A local copy of the adapter whose adapter_config.json pins the base's revision."""
    out = tmp_path / f"adapter-{revision}"
    shutil.copytree(FIXTURES / "mhr", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/tiny",
                                                         "revision": revision}))
    return out


def snapshot_dir(hub: Path, commit: str) -> Path:
    return hub / "models--org--tiny" / "snapshots" / commit


@pytest.mark.parametrize("revision, commit", [(None, MAIN), ("main", MAIN), (OLD, OLD), ("v1", OLD)])
def test_a_pinned_revision_resolves_to_its_snapshot(hub, tmp_path, revision, commit):
    """The adapter's recorded revision picks the snapshot: a commit, a branch or a tag (refs), main by default."""
    assert resolve_base_dir(None, "org/tiny", revision) == snapshot_dir(hub, commit)
    res = run("collapse", pinned(tmp_path, revision), "--task", "0", "--to", "dense", "--out", tmp_path / "out", "--json")
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)["base"]) == snapshot_dir(hub, commit)
    marked = "polytool_test_snapshot" in json.loads((tmp_path / "out" / "config.json").read_text())
    assert marked == (commit == OLD)  # the merged model was built on the pinned snapshot's files


def test_a_revision_not_in_the_cache_is_exit_2_naming_it(hub, tmp_path):
    """Never another snapshot in its place (the bug: one cached snapshot answered every revision)."""
    for revision in (MISSING, "v2"):
        res = run("collapse", pinned(tmp_path, revision), "--task", "0", "--to", "dense", "--out", tmp_path / "out")
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
        assert f"revision {revision!r} of 'org/tiny' is not in the Hugging Face cache" in res.stderr
        assert "HF_HUB_OFFLINE is set" in res.stderr and not (tmp_path / "out").exists()
    # one snapshot and no ref naming the revision: still refused
    shutil.rmtree(snapshot_dir(hub, OLD))
    with pytest.raises(CheckpointError, match="revision 'v1' of 'org/tiny'"):
        resolve_base_dir(None, "org/tiny", "v1")


def test_a_repo_not_in_the_cache(hub, tmp_path):
    res = run("collapse", FIXTURES / "mhr", "--base", "org/absent", "--task", "0", "--to", "dense", "--out", tmp_path / "o")
    assert res.exit_code == 2 and "base model 'org/absent' is neither a local directory nor in the Hugging Face cache" in res.stderr
    res = run("inspect", "org/absent-adapter")
    assert res.exit_code == 2 and "adapter 'org/absent-adapter' is neither a local directory nor" in res.stderr


def test_hub_ids_for_the_adapter_and_the_base(hub, tmp_path):
    """`inspect org/poly-adapter`, `--base org/tiny`, `org/tiny@rev`, `--revision`: all from the cache, offline."""
    res = run("inspect", "org/poly-adapter", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["base_model_name_or_path"] == "org/tiny"
    for args, commit in (((), MAIN), (("--base", "org/tiny"), MAIN), (("--base", f"org/tiny@{OLD}"), OLD),
                         (("--base", "org/tiny@v1"), OLD), (("--revision", "main"), MAIN)):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        res = run("collapse", "org/poly-adapter", *args, "--task", "1", "--to", "dense", "--out", out, "--json")
        assert res.exit_code == 0, (args, res.output)
        data = json.loads(res.stdout)
        assert Path(data["base"]) == snapshot_dir(hub, commit), args
        assert Path(data["adapter"]) == hub / "models--org--poly-adapter" / "snapshots" / MAIN
    res = run("inspect", "org/poly-adapter", "--revision", "v9")
    assert res.exit_code == 2 and "revision 'v9' of 'org/poly-adapter' is not in the Hugging Face cache" in res.stderr
    res = run("inspect", "org/poly-adapter@main", "--revision", "v9")
    assert res.exit_code == 2 and "pins revision 'main' but --revision says 'v9'" in res.stderr


def test_a_local_directory_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    """A directory named like a repo id is read from disk; a missing path that is no repo id is 'no such'."""
    local = tmp_path / "org" / "tiny"
    shutil.copytree(FIXTURES / "tiny-llama", local)
    monkeypatch.chdir(tmp_path)
    assert resolve_base_dir(None, "org/tiny") == Path("org/tiny")
    assert resolve_base_dir("org/tiny", None) == Path("org/tiny")
    with pytest.raises(CheckpointError, match="no such base model directory"):
        resolve_base_dir(tmp_path / "nope", None)


def test_merge_sources_as_hub_ids(hub, tmp_path):
    """`org/poly-adapter:0` and `org/poly-adapter@main:1` are merge sources; the base comes from the cache."""
    res = run("merge", "org/poly-adapter:0", "org/poly-adapter@main:1", "--to", "dense", "--out", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)["base"]) == snapshot_dir(hub, MAIN)
    res = run("merge", "org/absent:0", "--out", tmp_path / "n")
    assert res.exit_code == 2 and "adapter 'org/absent' is neither a local directory" in res.stderr
